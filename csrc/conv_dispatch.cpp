// ConvEngine: runs the build of the conv engine for the instruction set the MLP engine
// picked at load time (engine_isa(); FASTMETA_ISA overrides it for both).
#include <cstring>
#include <utility>

#include "conv_engine_isa.h"

namespace fastmeta {
namespace {

template <typename Scalar>
void dispatch(const ConvSpec& spec, MetaStepArgs<Scalar>& args, Arena& arena) {
#if defined(FASTMETA_X86_VARIANTS)
  static const char* const isa = engine_isa();
  if (std::strcmp(isa, "avx512") == 0) return avx512::conv_meta_step(spec, args, arena);
  if (std::strcmp(isa, "avx2") == 0) return avx2::conv_meta_step(spec, args, arena);
#endif
  generic::conv_meta_step(spec, args, arena);
}

}  // namespace

ConvEngine::ConvEngine(ConvSpec spec) : spec_(std::move(spec)) { spec_.validate(); }

void ConvEngine::meta_step(MetaStepArgs<float>& args) {
  std::lock_guard<std::mutex> lock(mutex_);
  dispatch(spec_, args, arena_);
  if (!args.all_finite) arena_.invalidate();
}

void ConvEngine::meta_step(MetaStepArgs<double>& args) {
  std::lock_guard<std::mutex> lock(mutex_);
  dispatch(spec_, args, arena_);
  if (!args.all_finite) arena_.invalidate();
}

}  // namespace fastmeta
