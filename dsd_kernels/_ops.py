"""Every dsd op, defined once: its schema and its fake (meta) implementation.

Backends register kernels for these names per device (see `backends/`); the public
functions in `dsd_kernels/functional.py` validate input and then call `torch.ops.dsd.<op>`.
The fake implementations let `torch.compile` and `torch.library.opcheck` trace the ops.

Semantics every backend shares (docs/design.md):
- magnitudes are compared as fp32 |x| (exact for fp16/bf16/fp32 inputs), by their key: the
  fp32 bit pattern of |x| (31 bits; +0.0 and -0.0 both 0), which orders like the magnitudes;
- `magnitude_masks` prunes the ks[i] smallest |x| of each segment (a tensor for scope
  "layer", all of them for "global"; the public function computes ks), ties broken by
  position (lower flat index, then earlier tensor, pruned first); masks are True where kept;
- `nm_masks` keeps, in every group of m consecutive entries along dim 1 (the reduction
  dimension of Linear and Conv weights), the n largest |x|, ties broken by position (the
  lower index along dim 1 pruned first); every tensor has 2+ dims and dim 1 a multiple of m;
- `nonzero_masks` keeps every entry that is not zero (+0.0 and -0.0 are both pruned): the
  masks of a model that is already sparse; a NaN raises, Inf is kept;
- a pruned position is written as +0.0 in the weight and in every optimizer state tensor;
- optimizer math runs in fp32 and is cast once on store; `grad_scale` (GradScaler's scale)
  divides the gradient inside the update.
"""

import torch

NAMESPACE = "dsd"

SCHEMAS = {
    "kth_smallest_abs": "(Tensor[] xs, int k) -> Tensor",
    # out[i]: the ks[i]-th smallest magnitude of xs[i] alone (1 <= ks[i] <= xs[i].numel()).
    "kth_smallest_abs_per_tensor": "(Tensor[] xs, int[] ks) -> Tensor",
    # hist[r, d]: how many entries of the tensors with rows[i] == r have a magnitude key whose
    # bits above shift + bits equal prefixes[r] and whose digit (key >> shift) % 2**bits is d;
    # 1 <= bits <= 8 and shift + bits <= 31.
    "magnitude_histogram": "(Tensor[] xs, int[] rows, Tensor prefixes, int shift, int bits) "
                           "-> Tensor",
    # ks: entries to prune per segment (one per tensor for "layer", one for "global"), each in
    # [0, the segment's numel].
    "magnitude_masks": "(Tensor[] xs, int[] ks, str scope) -> Tensor[]",
    # 1 <= n < m; every xs[i] has 2+ dims and its dim-1 size a multiple of m. A NaN raises
    # ValueError("xs[i] contains NaN; ..."): the kernel finds it in the pass that ranks.
    "nm_masks": "(Tensor[] xs, int n, int m) -> Tensor[]",
    # Masks True where x != 0. A NaN raises ValueError("xs[i] contains NaN; ..."): the kernel
    # finds it in its one pass.
    "nonzero_masks": "(Tensor[] xs) -> Tensor[]",
    "apply_masks_": "(Tensor(a!)[] xs, Tensor[] masks) -> ()",
    # values[i] (rounded to xs[i]'s dtype as torch's fill rounds it) at the pruned entries.
    "fill_pruned_": "(Tensor(a!)[] xs, Tensor[] masks, float[] values) -> ()",
    "masked_sgd_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool maximize, Tensor? grad_scale) -> ()"
    ),
    "masked_adam_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor?[] masks, float[] steps, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale) -> ()"
    ),
}
OPS = tuple(SCHEMAS)
# Why nonzero_masks refuses a NaN (every backend's message ends with it).
NAN_IS_NO_WEIGHT = "a NaN weight is neither zero nor a number to keep"

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def magnitude_dtype(xs) -> torch.dtype:
    """The dtype a threshold over `xs` is returned in: the promotion of their dtypes."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


@torch.library.register_fake(f"{NAMESPACE}::kth_smallest_abs")
def _kth_smallest_abs_fake(xs, k):
    return xs[0].new_empty((), dtype=magnitude_dtype(xs))


@torch.library.register_fake(f"{NAMESPACE}::kth_smallest_abs_per_tensor")
def _kth_smallest_abs_per_tensor_fake(xs, ks):
    return xs[0].new_empty((len(xs),), dtype=magnitude_dtype(xs))


@torch.library.register_fake(f"{NAMESPACE}::magnitude_histogram")
def _magnitude_histogram_fake(xs, rows, prefixes, shift, bits):
    return prefixes.new_empty((prefixes.numel(), 1 << bits), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::magnitude_masks")
def _magnitude_masks_fake(xs, ks, scope):
    return [torch.empty(x.shape, dtype=torch.bool, device=x.device) for x in xs]


@torch.library.register_fake(f"{NAMESPACE}::nm_masks")
def _nm_masks_fake(xs, n, m):
    return [torch.empty(x.shape, dtype=torch.bool, device=x.device) for x in xs]


@torch.library.register_fake(f"{NAMESPACE}::nonzero_masks")
def _nonzero_masks_fake(xs):
    return [torch.empty(x.shape, dtype=torch.bool, device=x.device) for x in xs]


@torch.library.register_fake(f"{NAMESPACE}::apply_masks_")
def _apply_masks_fake(xs, masks):
    return None


@torch.library.register_fake(f"{NAMESPACE}::fill_pruned_")
def _fill_pruned_fake(xs, masks, values):
    return None


@torch.library.register_fake(f"{NAMESPACE}::masked_sgd_")
def _masked_sgd_fake(params, grads, momentum_buffers, masks, lr, momentum, dampening,
                     weight_decay, nesterov, maximize, grad_scale):
    return None


@torch.library.register_fake(f"{NAMESPACE}::masked_adam_")
def _masked_adam_fake(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2,
                      eps, weight_decay, decoupled, maximize, grad_scale):
    return None
