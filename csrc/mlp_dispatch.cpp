// MlpEngine: owns the arena and picks, once per process, the engine build for the
// widest instruction set this CPU (and its OS) supports.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "mlp_engine_isa.h"

namespace fastmeta {

Arena::~Arena() { std::free(data_); }

char* Arena::reset(std::size_t bytes, std::unique_ptr<Plan> plan) {
  plan_.reset();
  bytes = std::max<std::size_t>(64, (bytes + 63) / 64 * 64);
  if (bytes > capacity_) {
    std::free(data_);
    data_ = static_cast<char*>(std::aligned_alloc(64, bytes));
    if (!data_) {
      capacity_ = 0;
      throw std::bad_alloc();
    }
    capacity_ = bytes;
  }
  std::memset(data_, 0, bytes);
  plan_ = std::move(plan);
  return data_;
}

namespace {

enum class Isa { generic, avx2, avx512 };

Isa detect_isa() {
  Isa best = Isa::generic;
#if defined(FASTMETA_X86_VARIANTS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
#endif
  // FASTMETA_ISA=generic|avx2|avx512 asks for a narrower build (never a wider one).
  if (const char* wanted = std::getenv("FASTMETA_ISA")) {
    if (std::strcmp(wanted, "generic") == 0) return Isa::generic;
    if (std::strcmp(wanted, "avx2") == 0 && best != Isa::generic) return Isa::avx2;
  }
  return best;
}

const Isa kIsa = detect_isa();

template <typename Scalar>
void dispatch(const MlpSpec& spec, MetaStepArgs<Scalar>& args, Arena& arena) {
  switch (kIsa) {
#if defined(FASTMETA_X86_VARIANTS)
    case Isa::avx512:
      return avx512::meta_step(spec, args, arena);
    case Isa::avx2:
      return avx2::meta_step(spec, args, arena);
#endif
    default:
      return generic::meta_step(spec, args, arena);
  }
}

}  // namespace

const char* engine_isa() {
  switch (kIsa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "generic";
  }
}

MlpEngine::MlpEngine(MlpSpec spec) : spec_(std::move(spec)) { spec_.validate(); }

// (Non-finite inputs stop the engine before it computes anything: nothing to forget.)
void MlpEngine::meta_step(MetaStepArgs<float>& args) {
  std::lock_guard<std::mutex> lock(mutex_);
  dispatch(spec_, args, arena_);
  if (!args.all_finite && args.inputs_finite) arena_.invalidate();
}

void MlpEngine::meta_step(MetaStepArgs<double>& args) {
  std::lock_guard<std::mutex> lock(mutex_);
  dispatch(spec_, args, arena_);
  if (!args.all_finite && args.inputs_finite) arena_.invalidate();
}

}  // namespace fastmeta
