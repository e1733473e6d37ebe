"""The Triton pair engine's tile policy: the tile sizes and warps of each launch, from the sm_90
builds at D = 128 as scripts/triton_compile_check.py reports them (registers, spills, SASS
instructions per tile element); `python -m dmlkern.bench.tiles` times the alternatives on a GPU
through TILE_OVERRIDES. The choice per (dtype, D, kernel, flags) is cached: a launch's host time."""
import torch
import triton

__all__ = ["TILE_OVERRIDES"]

# Tile settings for tuning runs (python -m dmlkern.bench.tiles): {"fwd": {...}, "bwd": {...}},
# each with any of block_m, block_n, block_k, block_dout, num_warps, num_stages, replacing
# what _tiles() chooses for every launch of that kernel. Empty: the defaults.
TILE_OVERRIDES: dict = {}
_TILE_KEYS = {"block_m", "block_n", "block_k", "block_dout", "num_warps", "num_stages"}


def _block_k(d):
    return max(16, min(64, triton.next_power_of_2(d)))


def _tiles(x, d, lift=False, symmetric=False, has_b=False, positives_only=False, hinge=False):
    """Tile sizes and warps for inputs like x (dtype) of width d, before TILE_OVERRIDES.

    Half the column tile (32 instead of 64; fp64 16 instead of 32) for the heavier kernels: the
    backward with the lifted term, the B_pos term or the symmetric sum (two sets of row constants,
    two dl/dv terms), the hinge backward in fp16 / bf16 (transform 1 at 64 columns: 40-68 bytes of
    spills per thread, none at 32; fp32 spills at 32 columns, not at 64), and the forward's
    positives-only passes 2 and 3 (positives_only). At 64
    columns the bf16 ones spill (92-188 bytes per thread; fp32 up to 1.7 KiB with B_pos), and the
    symmetric backward with mining counts 76 instructions per element against 57 at 32
    (predicates held in registers); only the plain symmetric backward is a little leaner at 64
    (47 against 51). Narrower tiles also let passes 2 and 3 skip more columns without positives.

    fp16 / bf16: 64 x 64 tiles over 4 warps (one warpgroup), D up to 256 in one K slice (ONE_K):
    the row block stays loaded, each column tile is loaded once (and is the backward's second
    operand too), and the column loop is the pipelined one. Over 8 warps Triton gives each
    warpgroup all 64 columns of the backward's tile (the layout of the second product's operand),
    which computes every similarity tile twice. At D = 256 the backward's 64 x 256 fp32
    accumulator spills ~300 bytes per thread; K slices instead would compute every tile once per
    128-wide output slice (82 instructions per element against 55).
    fp32 (IEEE products: FMA, 128 per element at D = 128): 64 x 64 over 8 warps with K slices of
    32. fp64: 32 x 32 over 4 warps."""
    half_cols = lift or symmetric or has_b or positives_only or (hinge and x.element_size() == 2)
    if x.dtype == torch.float64:
        return dict(block_m=32, block_n=16 if half_cols else 32, block_k=min(_block_k(d), 32),
                    block_dout=64, num_warps=4)
    if x.element_size() == 2:
        block_k = max(16, triton.next_power_of_2(d)) if d <= 256 else 64
        return dict(block_m=64, block_n=32 if half_cols else 64, block_k=block_k, block_dout=128, num_warps=4)
    return dict(block_m=64, block_n=32 if half_cols else 64, block_k=min(_block_k(d), 32), block_dout=128,
                num_warps=8)


def _with_overrides(tiles, kernel):
    """tiles with TILE_OVERRIDES[kernel] applied, each override checked (a ValueError names a bad
    key or value rather than launching a kernel with it)."""
    override = TILE_OVERRIDES.get(kernel) or {}
    unknown = set(override) - _TILE_KEYS
    if unknown:
        raise ValueError(f"TILE_OVERRIDES[{kernel!r}]: unknown keys {sorted(unknown)}; allowed {sorted(_TILE_KEYS)}")
    for key, value in override.items():
        lowest = {"num_warps": 1, "num_stages": 1, "block_k": 16}.get(key, 16)
        power_of_two = key != "num_stages"
        if not isinstance(value, int) or value < lowest or (power_of_two and value & (value - 1)):
            raise ValueError(f"TILE_OVERRIDES[{kernel!r}][{key!r}] must be an int >= {lowest}"
                             f"{', a power of two' if power_of_two else ''}; got {value!r}")
    return {**tiles, **override}


_LAUNCH_TILES = {}  # (dtype, D, kernel, flags, overrides) -> (constexprs, options)


def _launch_tiles(x, d, kernel, lift=False, symmetric=False, has_b=False, positives_only=False, hinge=False):
    """(tile constexprs, launch options) of one launch of `kernel` ("fwd" or "bwd"): _tiles, then
    TILE_OVERRIDES; ONE_K when D fits one K slice, and the backward's output slice BLOCK_DOUT
    (all of the padded D when ONE_K: the loaded tile is then both products' operand). Cached:
    the key holds everything the choice depends on, TILE_OVERRIDES' current entry included."""
    # Traced with dynamic shapes, D is a SymInt: the tiles are constexprs, so D is specialised
    # (a guard on the embedding width, a model constant; N stays dynamic).
    d = int(d)
    override = TILE_OVERRIDES.get(kernel) or {}
    key = (x.dtype, d, kernel, lift, symmetric, has_b, positives_only, hinge,
           repr(sorted(override.items())) if override else "")
    hit = _LAUNCH_TILES.get(key)
    if hit is None:
        t = _with_overrides(_tiles(x, d, lift=lift, symmetric=symmetric, has_b=has_b, positives_only=positives_only,
                                   hinge=hinge), kernel)
        const = dict(BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], ONE_K=t["block_k"] >= d)
        if kernel == "bwd":
            const["BLOCK_DOUT"] = (t["block_k"] if const["ONE_K"]
                                   else max(16, min(t["block_dout"], triton.next_power_of_2(d))))
        hit = _LAUNCH_TILES[key] = (const, {k: t[k] for k in ("num_warps", "num_stages") if k in t})
    return dict(hit[0]), dict(hit[1])
