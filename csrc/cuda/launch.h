// Launch sizes of the one-thread-per-item kernels (triplet_slots_cuda.cu, pair_margin_rows_cuda.cu).
#pragma once

#include <cstdint>

namespace dmlkern {

constexpr int kItemThreads = 256;  // threads per block

// Blocks for n items, one thread each.
inline unsigned item_blocks(int64_t n) { return static_cast<unsigned>((n + kItemThreads - 1) / kItemThreads); }

}  // namespace dmlkern
