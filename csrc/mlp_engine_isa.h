// The engine's entry points, one set per instruction set it is compiled for
// (mlp_engine.cpp is built once per ISA into its own namespace; mlp_dispatch.cpp picks
// one at load time).
#pragma once
#include "mlp_engine.h"

#define FASTMETA_DECLARE_ENGINE(isa)                                               \
  namespace fastmeta {                                                             \
  namespace isa {                                                                  \
  void meta_step(const MlpSpec& spec, MetaStepArgs<float>& args, Arena& arena);  \
  void meta_step(const MlpSpec& spec, MetaStepArgs<double>& args, Arena& arena); \
  }                                                                                \
  }

FASTMETA_DECLARE_ENGINE(generic)
#if defined(FASTMETA_X86_VARIANTS)
FASTMETA_DECLARE_ENGINE(avx2)
FASTMETA_DECLARE_ENGINE(avx512)
#endif
#undef FASTMETA_DECLARE_ENGINE
