// The conv engine's entry points, one per instruction set it is compiled for
// (conv_engine.cpp is built once per ISA into its own namespace, like the MLP engine;
// conv_dispatch.cpp picks the one engine_isa() names).
#pragma once
#include "conv_engine.h"

#define FASTMETA_DECLARE_CONV_ENGINE(isa)                                                \
  namespace fastmeta {                                                                   \
  namespace isa {                                                                        \
  void conv_meta_step(const ConvSpec& spec, MetaStepArgs<float>& args, Arena& arena);  \
  void conv_meta_step(const ConvSpec& spec, MetaStepArgs<double>& args, Arena& arena); \
  }                                                                                      \
  }

FASTMETA_DECLARE_CONV_ENGINE(generic)
#if defined(FASTMETA_X86_VARIANTS)
FASTMETA_DECLARE_CONV_ENGINE(avx2)
FASTMETA_DECLARE_CONV_ENGINE(avx512)
#endif
#undef FASTMETA_DECLARE_CONV_ENGINE
