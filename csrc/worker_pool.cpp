// The worker pool of worker_pool.h. One job at a time; the pool is created on first use
// and never destroyed (its threads sleep until the process exits).
#include "worker_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <new>
#include <thread>

#include <pthread.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastmeta {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

using Clock = std::chrono::steady_clock;

int64_t thread_cpu_nanos() {
  timespec now;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
}

// How much CPU time an idle worker spends watching for the next job before it sleeps. A
// training loop calls the engine again after ~50-100 us of Python, and a sleeping worker
// takes about as long to wake (longer on a busy machine), which would leave most of the
// next job to the caller. CPU time rather than wall time: a worker descheduled by a busy
// machine has not been watching. OMP_WAIT_POLICY=passive (no busy waiting) turns it off.
int64_t worker_spin_nanos() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  if (policy && (std::strcmp(policy, "passive") == 0 || std::strcmp(policy, "PASSIVE") == 0))
    return 0;
  return 2000000;
}

// How long a waiting thread spins before it starts yielding the CPU.
constexpr auto kWaitSpin = std::chrono::microseconds(20);

// state_: generation (bits 32-63) | closed (bit 31) | workers allowed to join (bits
// 16-30) | workers that joined (bits 0-15). One word, so joining is one compare-exchange
// that fails once the job is closed or a newer one is published.
constexpr uint64_t kClosed = uint64_t(1) << 31;
constexpr int kLimitShift = 16;
constexpr uint64_t kCountMask = (uint64_t(1) << kLimitShift) - 1;
constexpr uint64_t kLimitMask = (uint64_t(1) << 15) - 1;
constexpr int kMaxWorkers = int(kLimitMask);

class Pool {
 public:
  void run(int threads, void (*fn)(void*, int), void* ctx) {
    if (threads <= 1 || busy_.test_and_set(std::memory_order_acquire)) {
      fn(ctx, 0);
      return;
    }
    const int workers = start_workers(std::min(threads - 1, kMaxWorkers));
    fn_ = fn;  // read by workers only after they join this generation (see below)
    ctx_ = ctx;
    left_.store(0, std::memory_order_relaxed);
    const uint64_t generation = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store((generation << 32) | (uint64_t(workers) << kLimitShift),
                 std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mutex_); }  // a worker between its check and wait
      wake_.notify_all();
    }
    fn(ctx, 0);
    const uint64_t closed = state_.fetch_or(kClosed, std::memory_order_acq_rel);
    wait_for(left_, int64_t(closed & kCountMask));
    busy_.clear(std::memory_order_release);
  }

  // In a forked child the workers are gone and the locks may be in any state.
  void reset_after_fork() {
    new (&mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    sleepers_.store(0);
    started_ = 0;
    busy_.clear();
  }

 private:
  // Starts workers up to `count` (fewer if threads cannot be created); returns how many run.
  int start_workers(int count) {
    while (started_ < count) {
      try {
        std::thread([this] { work(); }).detach();
      } catch (...) {
        break;
      }
      ++started_;
    }
    return std::min(started_, count);
  }

  void work() {
    uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t state = next_job(seen);
      seen = state >> 32;
      // Join unless the job is closed, full, or already replaced by a newer one.
      while (!(state & kClosed) && (state & kCountMask) < ((state >> kLimitShift) & kLimitMask)) {
        if (state_.compare_exchange_weak(state, state + 1, std::memory_order_acquire)) {
          // Joined: the caller waits for left_ before it returns, so fn_ and ctx_ stay
          // this job's until we are done.
          fn_(ctx_, int(state & kCountMask) + 1);
          left_.fetch_add(1, std::memory_order_release);
          break;
        }
        if ((state >> 32) != seen) break;
      }
    }
  }

  // Waits for a generation other than `seen`: spins for a while, then sleeps.
  uint64_t next_job(uint64_t seen) {
    const int64_t until = thread_cpu_nanos() + spin_nanos_;
    for (int spins = 1;; ++spins) {
      const uint64_t state = state_.load(std::memory_order_acquire);
      if ((state >> 32) != seen) return state;
      cpu_relax();
      if (spins % 256 == 0 && thread_cpu_nanos() > until) break;  // (the clock costs ~0.5 us)
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return (state_.load(std::memory_order_seq_cst) >> 32) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return state_.load(std::memory_order_acquire);
  }

  const int64_t spin_nanos_ = worker_spin_nanos();
  std::atomic_flag busy_ = ATOMIC_FLAG_INIT;  // a job is running
  std::atomic<uint64_t> state_{0};
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int64_t> left_{0};  // workers that joined the job and returned from fn
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  int started_ = 0;  // changed only by the caller that holds busy_
};

Pool& pool() {
  static Pool* const instance = [] {
    Pool* p = new Pool();  // never destroyed: detached workers may still reference it
    pthread_atfork(nullptr, nullptr, [] { pool().reset_after_fork(); });
    return p;
  }();
  return *instance;
}

}  // namespace

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void run_parallel(int threads, void (*fn)(void*, int), void* ctx) {
  pool().run(threads, fn, ctx);
}

void wait_for(const std::atomic<int64_t>& counter, int64_t target) {
  if (counter.load(std::memory_order_acquire) >= target) return;
  const auto until = Clock::now() + kWaitSpin;
  for (int spins = 1; counter.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 64 || Clock::now() < until) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace fastmeta
