// Single-pass masked SGD and Adam/AdamW: each element of the parameter, its gradient, its state
// and its mask is read once and written once. The math is dsd_kernels/backends/torch_ref.py's,
// operation for operation, in fp32 with one rounding on store; a pruned position of the
// parameter and of every state tensor is written as +0.0, whatever the gradient.
#include "dsd_cpu.h"

#include <torch/library.h>

#include <array>
#include <optional>

namespace dsd_cpp {
namespace {

// Elements per parallel task; a whole list of parameters is one parallel loop over tasks.
constexpr int64_t kChunk = int64_t{1} << 15;

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// One parameter's operands, all in the parameter's dense layout (dsd_cpu.h: in_layout).
struct Operands {
  at::Tensor param;
  at::Tensor grad;
  std::vector<at::Tensor> states;
  std::optional<at::Tensor> keep;  // the bool mask; none = dense update
};

Operands gather(const char* op, size_t i, const at::Tensor& param, const at::Tensor& grad,
                std::vector<at::Tensor> states, const std::optional<at::Tensor>& mask) {
  auto check_like = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.sizes() == param.sizes() && t.scalar_type() == param.scalar_type(), op, ": ",
                what, "[", i, "] must have the shape and dtype of params[", i, "]");
  };
  check_like(grad, "grads");
  for (const auto& state : states) check_like(state, "state");
  Operands operands;
  operands.param = dense_layout(param);
  operands.grad = in_layout(grad, operands.param);
  for (const auto& state : states) operands.states.push_back(in_layout(state, operands.param));
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == param.sizes(), op,
                ": masks[", i, "] must be a bool tensor shaped like params[", i, "]");
    operands.keep = in_layout(*mask, operands.param);
  }
  return operands;
}

// Runs kernel(scalar_t{}, operands, begin, n) over every parameter's elements, in parallel.
template <typename Kernel>
void for_each_span(const std::vector<Operands>& operands, const Kernel& kernel) {
  std::vector<int64_t> numels;
  for (const auto& o : operands) numels.push_back(o.param.numel());
  const std::vector<Span> spans = split_spans(numels, kChunk);
  parallel_dynamic(static_cast<int64_t>(spans.size()), [&](int64_t s) {
    const Span& span = spans[s];
    dispatch_float_dtype(operands[span.tensor].param.scalar_type(), [&](auto zero) {
      kernel(zero, span.tensor, span.begin, span.end - span.begin);
    });
  });
}

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<scalar_t*>(t.data_ptr()) + offset;
}

const bool* keep_ptr(const Operands& o, int64_t offset) {
  return o.keep.has_value() ? o.keep->data_ptr<bool>() + offset : nullptr;
}

// The gradient as the update sees it: unscaled by GradScaler's scale, negated to maximize.
struct GradTransform {
  bool scaled;
  fVec scale;
  bool maximize;
  fVec operator()(fVec g) const {
    if (scaled) g = g / scale;
    return maximize ? g.neg() : g;
  }
};

GradTransform grad_transform(const std::optional<at::Tensor>& grad_scale, bool maximize) {
  float scale = grad_scale.has_value() ? grad_scale->to(at::kFloat).item<float>() : 1.0f;
  return {grad_scale.has_value(), fVec(scale), maximize};
}

// ---- SGD ---------------------------------------------------------------------------------

struct SgdConstants {
  fVec lr, momentum, dampening_complement, weight_decay;
  bool use_momentum, use_weight_decay, nesterov;
};

template <typename scalar_t>
void sgd_kernel(scalar_t* p, const scalar_t* g, scalar_t* buf, const bool* mask, int64_t n,
                const SgdConstants& c, const GradTransform& transform) {
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t count = std::min(kStep, n - i);
    auto [p0, p1] = load_fp32(p + i, count);
    auto [g0, g1] = load_fp32(g + i, count);
    std::array<fVec, 2> param{p0, p1}, grad{g0, g1}, momentum{};
    if (c.use_momentum) {
      auto [b0, b1] = load_fp32(buf + i, count);
      momentum = {b0, b1};
    }
    for (int h = 0; h < 2; ++h) {
      fVec d = transform(grad[h]);
      if (c.use_weight_decay) d = d + c.weight_decay * param[h];
      if (c.use_momentum) {
        momentum[h] = momentum[h] * c.momentum + c.dampening_complement * d;
        d = c.nesterov ? d + c.momentum * momentum[h] : momentum[h];
      }
      param[h] = param[h] - c.lr * d;
    }
    if (mask != nullptr) {
      auto [k0, k1] = keep_bits(mask + i, count);
      param = {param[0] & k0, param[1] & k1};
      momentum = {momentum[0] & k0, momentum[1] & k1};
    }
    store_fp32(p + i, param[0], param[1], count);
    if (c.use_momentum) store_fp32(buf + i, momentum[0], momentum[1], count);
  }
}

void masked_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const OptionalTensors& masks, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize,
                 const std::optional<at::Tensor>& grad_scale) {
  const bool use_momentum = momentum != 0;
  TORCH_CHECK(grads.size() == params.size() && masks.size() == params.size() &&
                  momentum_buffers.size() == (use_momentum ? params.size() : 0),
              "dsd_cpp.masked_sgd_: list lengths differ");
  std::vector<Operands> operands;
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<at::Tensor> states;
    if (use_momentum) states.push_back(momentum_buffers[i]);
    operands.push_back(gather("dsd_cpp.masked_sgd_", i, params[i], grads[i], states, masks.get(i)));
  }
  // Hyper-parameters enter the fp32 math as fp32, as torch's tensor-scalar ops take them.
  const SgdConstants c{fVec(static_cast<float>(lr)), fVec(static_cast<float>(momentum)),
                       fVec(static_cast<float>(1 - dampening)), fVec(static_cast<float>(weight_decay)),
                       use_momentum, weight_decay != 0, nesterov};
  const GradTransform transform = grad_transform(grad_scale, maximize);
  for_each_span(operands, [&](auto zero, int64_t t, int64_t begin, int64_t n) {
    using scalar_t = decltype(zero);
    const Operands& o = operands[t];
    scalar_t* buf = use_momentum ? ptr<scalar_t>(o.states[0], begin) : nullptr;
    sgd_kernel(ptr<scalar_t>(o.param, begin), ptr<scalar_t>(o.grad, begin), buf, keep_ptr(o, begin),
               n, c, transform);
  });
  for (size_t i = 0; i < params.size(); ++i) {
    write_back(operands[i].param, params[i]);
    if (use_momentum) write_back(operands[i].states[0], momentum_buffers[i]);
  }
}

// ---- Adam / AdamW ------------------------------------------------------------------------

struct AdamConstants {
  fVec lerp_weight, lerp_weight_minus_one, beta2, one_minus_beta2, eps, weight_decay;
  fVec decay_factor;  // AdamW: p *= 1 - lr * weight_decay
  bool small_lerp_weight, use_weight_decay, decoupled;
};

struct AdamStep {  // bias corrections of one parameter's step, computed in double
  fVec step_size, bias_correction2_sqrt;
};

template <typename scalar_t>
void adam_kernel(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, const bool* mask,
                 int64_t n, const AdamConstants& c, const AdamStep& s,
                 const GradTransform& transform) {
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t count = std::min(kStep, n - i);
    auto [p0, p1] = load_fp32(p + i, count);
    auto [g0, g1] = load_fp32(g + i, count);
    auto [m0, m1] = load_fp32(m + i, count);
    auto [v0, v1] = load_fp32(v + i, count);
    std::array<fVec, 2> param{p0, p1}, grad{g0, g1}, exp_avg{m0, m1}, exp_avg_sq{v0, v1};
    for (int h = 0; h < 2; ++h) {
      fVec d = transform(grad[h]);
      if (c.use_weight_decay) {
        if (c.decoupled) param[h] = param[h] * c.decay_factor;
        else d = d + c.weight_decay * param[h];
      }
      // torch.lerp(exp_avg, d, 1 - beta1), as ATen's vectorized lerp computes it.
      exp_avg[h] = c.small_lerp_weight
                       ? at::vec::fmadd(c.lerp_weight, d - exp_avg[h], exp_avg[h])
                       : at::vec::fmadd(c.lerp_weight_minus_one, d - exp_avg[h], d);
      exp_avg_sq[h] = exp_avg_sq[h] * c.beta2 + c.one_minus_beta2 * d * d;
      const fVec denom = exp_avg_sq[h].sqrt() / s.bias_correction2_sqrt + c.eps;
      param[h] = param[h] - s.step_size * exp_avg[h] / denom;
    }
    if (mask != nullptr) {
      auto [k0, k1] = keep_bits(mask + i, count);
      param = {param[0] & k0, param[1] & k1};
      exp_avg = {exp_avg[0] & k0, exp_avg[1] & k1};
      exp_avg_sq = {exp_avg_sq[0] & k0, exp_avg_sq[1] & k1};
    }
    store_fp32(p + i, param[0], param[1], count);
    store_fp32(m + i, exp_avg[0], exp_avg[1], count);
    store_fp32(v + i, exp_avg_sq[0], exp_avg_sq[1], count);
  }
}

void masked_adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, const OptionalTensors& masks,
                  at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps,
                  double weight_decay, bool decoupled, bool maximize,
                  const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size() && masks.size() == params.size() &&
                  steps.size() == params.size(),
              "dsd_cpp.masked_adam_: list lengths differ");
  std::vector<Operands> operands;
  std::vector<AdamStep> bias_corrections;
  for (size_t i = 0; i < params.size(); ++i) {
    operands.push_back(gather("dsd_cpp.masked_adam_", i, params[i], grads[i],
                              {exp_avgs[i], exp_avg_sqs[i]}, masks.get(i)));
    bias_corrections.push_back(
        {fVec(static_cast<float>(lr / (1 - std::pow(beta1, steps[i])))),
         fVec(static_cast<float>(std::sqrt(1 - std::pow(beta2, steps[i]))))});
  }
  const float lerp_weight = static_cast<float>(1 - beta1);
  const AdamConstants c{fVec(lerp_weight), fVec(lerp_weight - 1.0f), fVec(static_cast<float>(beta2)),
                        fVec(static_cast<float>(1 - beta2)), fVec(static_cast<float>(eps)),
                        fVec(static_cast<float>(weight_decay)),
                        fVec(static_cast<float>(1 - lr * weight_decay)),
                        std::abs(lerp_weight) < 0.5f, weight_decay != 0, decoupled};
  const GradTransform transform = grad_transform(grad_scale, maximize);
  for_each_span(operands, [&](auto zero, int64_t t, int64_t begin, int64_t n) {
    using scalar_t = decltype(zero);
    const Operands& o = operands[t];
    adam_kernel(ptr<scalar_t>(o.param, begin), ptr<scalar_t>(o.grad, begin),
                ptr<scalar_t>(o.states[0], begin), ptr<scalar_t>(o.states[1], begin),
                keep_ptr(o, begin), n, c, bias_corrections[t], transform);
  });
  for (size_t i = 0; i < params.size(); ++i) {
    write_back(operands[i].param, params[i]);
    write_back(operands[i].states[0], exp_avgs[i]);
    write_back(operands[i].states[1], exp_avg_sqs[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dsd_cpp, CPU, m) {
  m.impl("masked_sgd_", TORCH_FN(masked_sgd_));
  m.impl("masked_adam_", TORCH_FN(masked_adam_));
}

}  // namespace dsd_cpp
