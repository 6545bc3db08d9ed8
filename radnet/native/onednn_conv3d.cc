// 3D convolutions for XLA:CPU through oneDNN, as XLA FFI custom calls.
//
// Why by hand: XLA:CPU runs the 3×3×3 convolutions of a 3D ResNet at 35–120 GFLOP/s on
// the CPUs we measured, and the kernel gradient at ~35 (docs/performance.md); oneDNN,
// the library PyTorch's CPU convolutions run on, reaches 250–300 on the same layers.
// XLA's own oneDNN switches do not cover 3D convolutions (measured: no change), so radnet
// calls the library itself. This file only translates shapes and layouts; every
// convolution is oneDNN's.
//
// Layouts are radnet's (flax): activations [B, D, H, W, C] (oneDNN tag ndhwc), kernels
// [kd, kh, kw, C_in, F] (tag dhwio). The forward pass reads the kernel in that layout where
// oneDNN has a direct kernel for it; otherwise, and for the gradients, oneDNN wants a blocked
// layout and the kernel is reordered per call (a kernel is small next to the activations).
//
// Three handlers, each a plain function of its operands:
//   radnet_conv3d_fwd(x, w) -> y, radnet_conv3d_bwd_data(dy, w) -> dx,
//   radnet_conv3d_bwd_weights(x, dy) -> dw
// with int64 attributes strides, pads_lo, pads_hi (3 each; dilation 1).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One compiled primitive per (kind, shapes, strides, pads), built on first use.
struct Plan {
  dnnl::primitive prim;
  memory::desc src, dst, wei_user, wei_prim, scratch;
  bool reorder = false;
  dnnl::reorder wei_reorder;  // user → primitive (fwd, bwd data), primitive → user (bwd weights)
};

using Key = std::tuple<int, memory::dims, memory::dims, memory::dims, memory::dims,
                       memory::dims, memory::dims>;

std::shared_ptr<Plan> MakePlan(const Key& key) {
  const auto& [kind, src, wei, dst, strides, lo, hi] = key;
  auto& eng = Engine();
  const auto f32 = memory::data_type::f32;
  auto plan = std::make_shared<Plan>();
  plan->src = memory::desc(src, f32, tag::ndhwc);
  plan->dst = memory::desc(dst, f32, tag::ndhwc);
  plan->wei_user = memory::desc(wei, f32, tag::dhwio);
  memory::desc wei_any(wei, f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-call scratchpad: thread-safe
  auto fwd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, plan->src,
      wei_any, plan->dst, strides, lo, hi, attr);
  // The primitive, its scratchpad and the kernel layout it wants.
  auto take = [&plan](auto pd, const memory::desc& wei_prim, auto make) {
    plan->wei_prim = wei_prim;
    plan->scratch = pd.scratchpad_desc();
    plan->prim = make(pd);
  };
  if (kind == kForward) {
    // The forward pass reads the kernel in radnet's own layout where oneDNN has a direct
    // (brgconv) kernel for it: no reorder of the kernel per call, and on the VNet decoder's
    // 16–80-channel layers the direct kernel was also faster than the blocked one
    // (ONEDNN_VERBOSE, 16×64×64: 17→16 channels 8.6 → 4.5 ms). Where only the GEMM
    // fallback takes that layout, and for a 1-channel input (the stem: 6.9 ms in place
    // against 2.8 ms + a 3.7 ms reorder blocked, no gain), the kernel is reordered as before.
    std::string impl;
    dnnl::convolution_forward::primitive_desc plain;
    try {
      plain = dnnl::convolution_forward::primitive_desc(
          eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          plan->src, plan->wei_user, plan->dst, strides, lo, hi, attr);
      impl = plain.impl_info_str();
    } catch (const dnnl::error&) {
      impl.clear();
    }
    if (impl.rfind("brg", 0) == 0 && src[1] > 1) {
      take(plain, plain.weights_desc(), [](auto pd) { return dnnl::convolution_forward(pd); });
    } else {
      take(fwd, fwd.weights_desc(), [](auto pd) { return dnnl::convolution_forward(pd); });
    }
  } else if (kind == kBackwardData) {
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, plan->src, wei_any, plan->dst, strides, lo,
        hi, fwd, attr);
    take(bwd, bwd.weights_desc(), [](auto pd) { return dnnl::convolution_backward_data(pd); });
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, plan->src, wei_any, plan->dst, strides, lo,
        hi, fwd, attr);
    take(bwd, bwd.diff_weights_desc(),
         [](auto pd) { return dnnl::convolution_backward_weights(pd); });
  }
  plan->reorder = plan->wei_prim != plan->wei_user;
  if (plan->reorder) {
    plan->wei_reorder = kind == kBackwardWeights
                            ? dnnl::reorder(memory(plan->wei_prim, eng, nullptr),
                                            memory(plan->wei_user, eng, nullptr))
                            : dnnl::reorder(memory(plan->wei_user, eng, nullptr),
                                            memory(plan->wei_prim, eng, nullptr));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(const Key& key) {
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  auto plan = MakePlan(key);
  plans.emplace(key, plan);
  return plan;
}

// [B, D, H, W, C] → oneDNN's logical {B, C, D, H, W}; [kd, kh, kw, I, O] → {O, I, kd, kh, kw}.
memory::dims Activation(ffi::Span<const int64_t> d) { return {d[0], d[4], d[1], d[2], d[3]}; }
memory::dims Kernel(ffi::Span<const int64_t> d) { return {d[4], d[3], d[0], d[1], d[2]}; }
memory::dims Dims(ffi::Span<const int64_t> v) { return memory::dims(v.begin(), v.end()); }

ffi::Error Run(Kind kind, float* x, float* w, float* y, ffi::Span<const int64_t> x_dims,
               ffi::Span<const int64_t> w_dims, ffi::Span<const int64_t> y_dims,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> lo,
               ffi::Span<const int64_t> hi) {
  // x: src (or diff_src), w: weights (or diff_weights), y: dst (or diff_dst).
  if (x_dims.size() != 5 || w_dims.size() != 5 || y_dims.size() != 5 || strides.size() != 3 ||
      lo.size() != 3 || hi.size() != 3) {
    return ffi::Error::InvalidArgument("radnet_conv3d: rank-5 operands and 3 strides/pads");
  }
  try {
    Key key{kind,           Activation(x_dims), Kernel(w_dims), Activation(y_dims),
            Dims(strides), Dims(lo),           Dims(hi)};
    auto plan = GetPlan(key);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory src(plan->src, eng, x), dst(plan->dst, eng, y), wei_user(plan->wei_user, eng, w);
    memory wei = plan->reorder ? memory(plan->wei_prim, eng) : wei_user;
    memory scratch(plan->scratch, eng);
    if (kind != kBackwardWeights && plan->reorder) {
      plan->wei_reorder.execute(stream, wei_user, wei);
    }
    if (kind == kForward) {
      plan->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei},
                                  {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == kBackwardData) {
      plan->prim.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, wei},
                                  {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei},
                                  {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan->reorder) plan->wei_reorder.execute(stream, wei, wei_user);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("radnet_conv3d (oneDNN): ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, Ints strides, Ints lo,
                   Ints hi) {
  return Run(kForward, x.typed_data(), w.typed_data(), y->typed_data(), x.dimensions(),
             w.dimensions(), y->dimensions(), strides, lo, hi);
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, Ints strides, Ints lo,
                        Ints hi) {
  return Run(kBackwardData, dx->typed_data(), w.typed_data(), dy.typed_data(),
             dx->dimensions(), w.dimensions(), dy.dimensions(), strides, lo, hi);
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, Ints strides,
                           Ints lo, Ints hi) {
  return Run(kBackwardWeights, x.typed_data(), dw->typed_data(), dy.typed_data(),
             x.dimensions(), dw->dimensions(), dy.dimensions(), strides, lo, hi);
}

}  // namespace

#define RADNET_BIND(first, second)                                      \
  ffi::Ffi::Bind()                                                      \
      .Arg<F32>()                                                       \
      .Arg<F32>()                                                       \
      .Ret<F32>()                                                       \
      .Attr<Ints>("strides")                                            \
      .Attr<Ints>("pads_lo")                                            \
      .Attr<Ints>("pads_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadnetConv3dForward, Forward, RADNET_BIND(x, w));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RadnetConv3dBackwardData, BackwardData, RADNET_BIND(dy, w));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RadnetConv3dBackwardWeights, BackwardWeights, RADNET_BIND(x, dy));
