// The engine's threads: a small process-wide pool of persistent workers.
//
// Why not an OpenMP parallel region: a region ends with a barrier that waits for every
// thread of the team, so on a busy machine one descheduled worker stalls the whole call
// for a scheduler time slice (milliseconds, against a ~100 us meta-step; measured: a
// 2-thread meta-step's median went from 0.1 to 18 ms with both cores busy). Here the
// caller runs the job too, workers join it only if they are ready in time, and the
// caller waits only for workers that took part: a late or descheduled worker costs
// parallelism, not a stall.
//
// Workers spin for a short while after each job (a training loop calls again within
// tens of microseconds), then sleep until the next one.
#pragma once
#include <atomic>
#include <cstdint>

namespace fastmeta {

// The number of threads the engine may use: OpenMP's setting (OMP_NUM_THREADS,
// torch.set_num_threads: torch and the engine share the OpenMP runtime), or 1.
int max_threads();

// Runs fn(ctx, slot) on the calling thread with slot 0 and on up to threads - 1 pool
// workers, each with its own slot in [1, threads), that join while the job is open.
// Returns after fn has returned on every thread that joined. Slot 0 must be able to do
// all the work alone, and must itself wait for work that other slots took. A job that
// finds the pool busy (another engine running on another thread) runs on the caller alone.
void run_parallel(int threads, void (*fn)(void* ctx, int slot), void* ctx);

// Waits until counter >= target (acquire): spins briefly, then yields the CPU between
// checks, so that a descheduled thread being waited for can run.
void wait_for(const std::atomic<int64_t>& counter, int64_t target);

}  // namespace fastmeta
