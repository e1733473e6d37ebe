// The one place where dmlkern's operator schemas are declared. Each backend
// (csrc/cpu, csrc/cuda) registers implementations with TORCH_LIBRARY_IMPL;
// Python adds fake tensors and autograd (dmlkern/ops). No Python here, so the
// same file builds into the libtorch-only shared library (CMakeLists.txt).
#include <torch/library.h>

TORCH_LIBRARY(dmlkern, m) {
  // The tiled pair engine (docs/ENGINE.md): one pass of per-row statistics over
  // v = transform(<x_i, y_j>) with label / mining masks. row_in (N, 3) in the stats
  // dtype; params = [sc_pos, off_pos, sc_neg, off_neg, eps], or 9 with transform 2's
  // [relu_pos, shift_pos, relu_neg, shift_neg] after them. Returns row_out (N, 2),
  // (N, 3) for pass_kind 2 and 3, or (N, 4) for pass_kind 4 (hinge), in fp32 (fp64 for fp64
  // inputs). Pass 3 (lifted pairs) needs the symmetric case: y is x, y_labels is x_labels,
  // exclude_diag, mining 0; pass 4 needs mining 0; transform 2 (circle) pass 1 and mining 0.
  // A masked row log-sum-exp log sum_j exp(scale * <x_i, y_j>) is pass 1 (lse2) with params
  // [scale, 0, scale, 0, 0]: column 0 sums the same-label pairs (without j == i when
  // exclude_diag), column 1 the different-label pairs (dmlkern.ops.masked_lse is that epilogue).
  m.def(
      "pair_engine_forward(Tensor x, Tensor y, Tensor x_labels, Tensor y_labels, Tensor row_in, "
      "int pass_kind, int transform, int mining, float[] params, bool exclude_diag) -> Tensor");
  // Recomputes the tiles; row_coef (N, 5) = (A_pos, LSE_pos, A_neg, LSE_neg, B_pos), or
  // (N, 6) with C_lift (pass 3's term; the symmetric case only), or (N, 2) = (H_pos, H_neg):
  // the hinge backward (pass 4's; mining 0). Transform 2 takes (N, 5) only.
  // Returns (grad_x, grad_y) in the input dtype. symmetric: the caller passes y = x and
  // y_labels = x_labels (shapes are checked) and wants only their sum: it comes back as
  // grad_x, with grad_y zero, from one side's tiles (pairs (a, b) and (b, a) together).
  m.def(
      "pair_engine_backward(Tensor x, Tensor y, Tensor x_labels, Tensor y_labels, Tensor row_in, "
      "Tensor row_coef, int transform, int mining, float[] params, bool exclude_diag, "
      "bool symmetric=False) -> (Tensor, Tensor)");
  // The non-symmetric backward with grad_y written into the caller's buffer (y's shape, x's
  // dtype, any strides, overlapping nothing), CPU only: the class path (fused/class_softmax.py)
  // passes its block of the weights' gradient, so no block-sized gradient is allocated (and
  // page-faulted) per block. Returns grad_x.
  m.def(
      "pair_engine_backward_into(Tensor x, Tensor y, Tensor x_labels, Tensor y_labels, "
      "Tensor row_in, Tensor row_coef, int transform, int mining, float[] params, "
      "bool exclude_diag, Tensor(a!) grad_y) -> Tensor");
  // a @ b.T for a (N, D), b (M, D) of one floating dtype, in that dtype, with the same bits on
  // every call and at any CPU thread count (fixed output tiles, one BLAS thread each; on CUDA
  // one cuBLAS product). dmlkern.ops.fixed_mm adds autograd (through this op again).
  m.def("fixed_mm(Tensor a, Tensor b) -> Tensor");
  // The same product written into `out` (N, M) of a's dtype and device, any strides, overlapping
  // neither input: blocked callers reuse one buffer per block instead of allocating it afresh.
  // Returns nothing: torch.compile functionalizes custom ops only without aliased outputs.
  m.def("fixed_mm_into(Tensor a, Tensor b, Tensor(a!) out) -> ()");
  // torch.cdist(a, b, p=2)'s product form (one product of [-2a, |a|^2, 1] and [b, 1, |b|^2],
  // clamped at 0, square root) with the product as fixed_mm's: the same bits at any CPU thread
  // count. CPU only (fp32, fp64); dmlkern.ops.fixed_cdist adds autograd.
  m.def("fixed_cdist(Tensor a, Tensor b) -> Tensor");
  // Its backward, torch's formula with fixed_mm's products (0 where the distance is 0):
  // (grad_a, grad_b).
  m.def("fixed_cdist_backward(Tensor grad, Tensor a, Tensor b, Tensor dist) -> (Tensor, Tensor)");
  // torch.softmax(t, dim) and its backward given y = softmax(t) and y's gradient, (grad - y . grad)
  // * y along dim, each row's dot product one serial sum: the same bits at any CPU thread count
  // (torch's CPU softmax backward splits rows by it). CPU only (fp32, fp64); the Autograd kernel
  // (csrc/autograd.cpp) differentiates fixed_softmax with fixed_softmax_backward.
  m.def("fixed_softmax(Tensor t, int dim) -> Tensor");
  m.def("fixed_softmax_backward(Tensor y, Tensor grad, int dim) -> Tensor");
  // rows (R, D) / max(|row|, eps) written into out (rows' shape and dtype, any strides; may be
  // rows), returning the norms (R, 1); and that normalisation's backward given the gradient of
  // its output, (grad - y (y . grad) [norm >= eps]) / max(norm, eps) written into out (may be
  // grad). CPU only (fp32, fp64), no autograd: the class-weight losses' blocks of weight rows
  // (dmlkern.ops.unit_rows_op).
  m.def("unit_rows(Tensor rows, float eps, Tensor(a!) out) -> Tensor");
  m.def("unit_rows_backward(Tensor grad, Tensor y, Tensor norms, float eps, Tensor(a!) out) -> ()");
  // The dot products of listed row pairs: out[p] = <a[i[p]], b[j[p]]> (P,) for a (R, K), b (Q, K)
  // of one dtype and i, j (P,) int64 row indices, each sum in double over a fixed order. CPU only
  // (fp32, fp64), no autograd: AngularLoss's blocked path (dmlkern.ops.pair_dots_op), as the next.
  m.def("pair_dots(Tensor a, Tensor b, Tensor i, Tensor j) -> Tensor");
  // And the sums over each row's listed pairs: out[r] = (sum over the pairs p with i[p] == r, in
  // listed order, of w[p] b[j[p]]) * scale[r] (scale (R, K) when given), written into out (R, K)
  // of b's dtype with contiguous rows, sharing no memory with b or scale; 0 for a row of no pair.
  m.def("pair_row_sums(Tensor b, Tensor i, Tensor j, Tensor w, Tensor? scale, Tensor(a!) out) -> ()");
  // The fused TripletMarginLoss's per-row work on one row block of similarities s (B, M)
  // (dmlkern/fused/triplet.py): params = [margin, window_margin], flags = [smooth_loss,
  // euclidean, window(, swap(, sorted_min_positives))] with window 0 every triplet, 1 all,
  // 2 hard, 3 semihard, 4 easy (the miner's type_of_triplets); swap 1: each triplet's e_an is
  // min(e_an, e_pn), the block then holds whole classes of the batch against itself sorted by
  // label (column row0 + k is row k, exclude_diag), so that every positive's row is in it; a row with at least
  // sorted_min_positives positives (default 128; relu terms, no swap) sorts its negatives once
  // and takes each positive's terms as a run of them. Returns per row the sum of the
  // kept terms (B,), the numbers of kept non-zero terms and of kept triplets (B, 2) int64, and
  // with with_grad the gradient of the total, dL/ds (B, M) (else an empty tensor). row0: the
  // block's first row (exclude_diag drops the pair (i, row0 + i) from the positives).
  m.def(
      "triplet_rows(Tensor s, Tensor row_labels, Tensor col_labels, int row0, bool exclude_diag, "
      "float[] params, int[] flags, bool with_grad) -> (Tensor, Tensor, Tensor)");
  // The same per-row work, the row's positives given: slots (B, P) int64 (their columns, -1 for
  // none; the diagonal left out by the caller), flags = [smooth_loss, euclidean, window, swap,
  // row0] (swap: the block is rows row0 .. row0 + B of the batch against itself, whole classes,
  // sorted by label); fp32 / fp64. The CUDA C++ backend's row sweep (csrc/cuda; its
  // per-thread bodies, csrc/triplet_slots.h, run on the CPU too, as its tested twin). Returns per
  // row the sum of the kept terms (B,), the two counts (B, 2) int64, and with with_grad dL/ds
  // (B, M), 0 at the positives' columns, and the positives' dL/de (B, P) (else empty tensors).
  m.def(
      "triplet_slot_rows(Tensor s, Tensor slots, Tensor row_labels, Tensor col_labels, float[] params, "
      "int[] flags, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // ContrastiveLoss on a PairMarginMiner's pairs, one row block of unit-row similarities s (B, M)
  // (dmlkern/fused/pair_margin_contrastive.py): params = [pos_margin, neg_margin,
  // miner_pos_margin, miner_neg_margin], flags = [loss_euclidean, miner_euclidean] (each value
  // sqrt(max(2 - 2s, 0)), else s); fp32 / fp64. Without coef: the block's sums of the kept pairs'
  // terms (2,) (positive, negative side) and counts (4,) int64 (terms > 0 a side, kept pairs a
  // side), and an empty dL/ds; with coef (2,) (the sides' upstream slopes): empty totals and dL/ds
  // (B, M). The CUDA C++ backend's kernel (csrc/cuda; its per-thread bodies,
  // csrc/pair_margin_rows.h, run on the CPU too, as its tested twin). row0, exclude_diag as
  // triplet_rows.
  m.def(
      "pair_margin_rows(Tensor s, Tensor row_labels, Tensor col_labels, int row0, bool exclude_diag, "
      "float[] params, int[] flags, Tensor? coef) -> (Tensor, Tensor, Tensor)");
  // Its CPU forward for the fused loss, CPU only: the same totals, and with list_live the block's
  // live pairs (kept, term > 0; else none) in row order as (L, 2) int64 (row in the block, column) and (L,) int8 sides (0
  // positive, 1 negative). thresholds = [t_pos, t_neg]: only positive pairs with s < t_pos and
  // negative pairs with s > t_neg can be kept (the caller's necessary condition on s, which spares
  // the exact test on the miner's value elsewhere).
  m.def(
      "pair_margin_live(Tensor s, Tensor row_labels, Tensor col_labels, int row0, bool exclude_diag, "
      "float[] params, int[] flags, float[] thresholds, bool list_live) -> (Tensor, Tensor, Tensor, Tensor)");
  // BatchEasyHardMiner's per-row picks on one row block of its distance matrix mat (B, M)
  // (dmlkern/fused/blocked_miners.py): modes = [pos_mode, neg_mode, order], a side's mode 0 (not
  // picked), 1 (min) or 2 (max); order 0 (independent), 1 (negatives first, then the positives
  // strictly beyond each row's negative value: semihard positives) or 2 (the reverse).
  // pos_range / neg_range: [] or [lo, hi] (lo <= x <= hi). Returns per row and side (column 0
  // positives, 1 negatives) torch.min / max's (value, index) over the filled row, and ok
  // (B, 2) bool: whether the side had a candidate. row0, exclude_diag as triplet_rows.
  m.def(
      "batch_hard_rows(Tensor mat, Tensor row_labels, Tensor col_labels, int row0, bool exclude_diag, "
      "int[] modes, float[] pos_range, float[] neg_range) -> (Tensor, Tensor, Tensor)");
  // The fused PNPLoss's per-row work on one row block of similarities s (B, M)
  // (dmlkern/fused/pnp.py), CPU only: for each row i and class member slot j with real[i][j]
  // (cols (B, P) int64: the member's column), the rank sum over the columns k whose col_labels
  // differ from row_labels[i] of 1 / (1 + exp(clamp(-(s_ik - s_ij) / anneal, -50, 50))) (B, P), 0
  // where not real. The backward takes g_rank (B, P) = dL/drank and returns dL/ds (B, M).
  m.def("pnp_ranks(Tensor s, Tensor cols, Tensor real, Tensor row_labels, Tensor col_labels, float anneal) -> Tensor");
  m.def(
      "pnp_ranks_backward(Tensor s, Tensor cols, Tensor real, Tensor row_labels, Tensor col_labels, float anneal, "
      "Tensor g_rank) -> Tensor");
  // The class path's block kernel for classes of `group` (K) weight rows (SubCenterArcFace,
  // SoftTriple: dmlkern/fused/class_softmax.py, GroupedBlock), CPU only. x (N, D) unit rows, w
  // (R, D) the block's unit weight rows, R = classes x K, class class0 + q owning rows q K ..
  // q K + K - 1; labels (N,) int64 global class ids. Per row and class, v reduces the K cosines
  // s_k = <x_i, w_qK+k>: reduce 0 their max (the gradient to the first k attaining it), 1 the
  // soft assignment sum_k softmax_k(s_k inv_gamma) s_k. Forward: lse_i = log sum over the
  // classes other than labels[i] of exp(scale v) (N,) in x's dtype (-inf when there is none).
  // Backward, given the gradient of lse and the full lse (N,) over every block: (grad_x, grad_w)
  // in x's dtype, bit-identical at any thread count. No autograd: the class path differentiates
  // by hand (grad_w is the gradient of the unit rows w).
  m.def(
      "grouped_class_lse(Tensor x, Tensor w, Tensor labels, int class0, int group, int reduce, "
      "float scale, float inv_gamma) -> Tensor");
  m.def(
      "grouped_class_lse_backward(Tensor x, Tensor w, Tensor labels, int class0, int group, "
      "int reduce, float scale, float inv_gamma, Tensor grad, Tensor lse) -> (Tensor, Tensor)");
  // The backward with grad_w written into the caller's buffer (w's shape, x's dtype, any strides,
  // overlapping nothing), as pair_engine_backward_into: returns grad_x.
  m.def(
      "grouped_class_lse_backward_into(Tensor x, Tensor w, Tensor labels, int class0, int group, "
      "int reduce, float scale, float inv_gamma, Tensor grad, Tensor lse, Tensor(a!) grad_w) -> "
      "Tensor");
}
