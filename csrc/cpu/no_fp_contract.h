// Included last by a source whose sums must not depend on the vector width: the rest of that
// file is compiled without fused multiply-adds (the vectorised clones would contract a * b + c,
// the scalar ones not, and round differently). Its functions' bits are then the same on every
// CPU clone (AVX-512, AVX2, baseline).
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
