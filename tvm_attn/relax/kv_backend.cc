// tvm_attn's kernels in TVM's runtime paged KV cache, through its ("flashinfer", run, plan) slots.
//
// TVM's cache (src/runtime/vm/paged_kv_cache.cc, attn_backend.h) calls a slot's `plan` once per
// forward, on the host with host copies of the index arrays, and its `run` once per layer. Here,
// `plan` runs tvm_attn's planner (the host TIR function `tvm_attn_plan`, compiled into the same
// library) into the cache's page-locked int workspace, copies the work lists to the device int
// workspace on the current stream, and returns the sizes `run` needs; `run` calls the CUDA kernels
// (host TIR functions of the same library) on views of the cache's tensors, then, for prefill, the
// merge kernel when the plan cut an item (the decode kernel merges the requests it cut itself). A
// paged-prefill plan whose requests all have one query token (a decode step: the cache routes
// decode to the prefill slot when the GQA group is 4 or more) runs the decode kernel.
//
// CUDA graphs. A decode step's `run` is capture-safe: it allocates nothing, reads and writes only
// the cache's tensors and its two workspaces (allocated once, at their fixed size, when the cache
// is created), launches the decode kernel on a grid that the SM count fixes (persistent, whatever
// the lengths), and takes the regions of the workspaces at offsets that depend on the batch size
// only (DecodeLayout). Everything a step changes, `plan` writes into those same workspaces from
// the host, outside the captured region (TVM's cache runs the plans on its copy stream, in the
// first attention call of a step or in get_query_positions), so a graph captured once replays
// the work lists of later steps. A prefill plan's kernel, tile and merge depend on the lengths:
// prefill steps are not for replay. What TVM 0.27's cache itself changes per step is documented
// in tvm_attn/relax/kv_cache.py (the addresses of its index arrays).
//
// tvm_attn/relax/kv_backend.py compiles this file with a generated header (TVM_ATTN_KV_CONFIG)
// that names the model's kernels and holds the schedule's and the planner's constants, layouts and
// sizing rules, generated from their Python description; nothing here is model-specific, and no
// number of the planner's is retyped here.

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace tvm_attn_kv {

using tvm::ffi::Array;
using tvm::ffi::Tensor;

struct PrefillTile {
  int64_t max_mean_rows;   // this tile serves batches whose mean GQA-packed query rows are <= this
  int64_t tile_q;          // packed query rows per CTA tile
  int64_t blocks_per_sm;   // resident CTAs per SM: sizes the persistent grid
  int64_t fold_heads;      // 1: the plan puts every KV head's items in the work list (tvm_attn.planner.planned_heads)
  int64_t work_overhead;   // planner cost of a work beyond its keys
  TVMFFISafeCallType paged, paged_merge, ragged, ragged_merge;
};

// one of a tile's kernels
using Kernel = TVMFFISafeCallType PrefillTile::*;

struct DecodeKernel {
  int64_t work_overhead;   // planner cost of a work beyond its keys
  int64_t pack_slack_div;
  TVMFFISafeCallType kernel;  // merges the requests it cuts (merge_count: one count per request and block row)
};

constexpr DLDataType kInt32{kDLInt, 32, 1}, kFloat32{kDLFloat, 32, 1};

// A DLTensor over `data`, with its own shape storage (not copyable: `t.shape` points into it).
struct View {
  DLTensor t;
  int64_t shape[5];
  View(void* data, DLDevice dev, DLDataType dtype, std::initializer_list<int64_t> dims) {
    int i = 0;
    for (int64_t d : dims) shape[i++] = d;
    t.data = data;
    t.device = dev;
    t.ndim = i;
    t.dtype = dtype;
    t.shape = shape;
    t.strides = nullptr;
    t.byte_offset = 0;
  }
  View(const View&) = delete;
  View& operator=(const View&) = delete;
  DLTensor* get() { return &t; }
};

template <typename... Args>
void Call(TVMFFISafeCallType fn, Args... args) {
  tvm::ffi::Function::FromExternC(nullptr, fn, nullptr)(args...);
}

}  // namespace tvm_attn_kv

// The generated header: the model's kernels (kPrefillTiles, kDecode, kPlanner), its shape (kNumQoHeads,
// kNumKvHeads, kHeadDim, kPageSize, kDType), and the planner's interface from tvm_attn.planner: the
// work-record and stats fields (kWork..., kStat...), the status codes and names, PlanParams (the
// planner's scalars by name, passed in its signature's order), and Layout (the workspace regions, with
// DecodeLayout / PrefillLayout sizing them by the planner's rules).
#include TVM_ATTN_KV_CONFIG

namespace tvm_attn_kv {

// plan_info (an Array<int64_t> that the cache hands back to run): these fields, then the Layout's
enum PlanField : int {
  kKind = 0,         // 0: decode kernel, 1: prefill kernel
  kTile,             // index into kPrefillTiles
  kBatch,
  kNumPartials,
  kCausal,           // the plan clipped keys to the causal range
  kNumPlanFields
};
constexpr int64_t kKindDecode = 0, kKindPrefill = 1;

// A contiguous tensor argument with its byte offset folded into the data pointer (the cache passes
// q, o, lse and its index arrays as views; the kernels take q, o and lse as offset-free buffers).
struct Rebased {
  DLTensor t;
  explicit Rebased(const Tensor& x) {
    t = *x.GetDLTensorPtr();
    t.data = static_cast<char*>(t.data) + t.byte_offset;
    t.byte_offset = 0;
  }
  DLTensor* get() { return &t; }
};

inline const char* DTypeName(DLDataType t) {
  if (t.code == kDLFloat && t.bits == 16) return "float16";
  if (t.code == kDLBfloat && t.bits == 16) return "bfloat16";
  if (t.code == kDLFloat && t.bits == 32) return "float32";
  return "other";
}

inline void CheckConfig(const char* what, int64_t num_qo_heads, int64_t num_kv_heads, int64_t qk_head_dim,
                        int64_t v_head_dim) {
  if (num_qo_heads != kNumQoHeads || num_kv_heads != kNumKvHeads || qk_head_dim != kHeadDim ||
      v_head_dim != kHeadDim) {
    TVM_FFI_THROW(ValueError) << what << ": tvm_attn's KV-cache kernels were built for " << kNumQoHeads << "/"
                              << kNumKvHeads << " heads, head_dim " << kHeadDim << "; the cache asks for "
                              << num_qo_heads << "/" << num_kv_heads << " heads, head_dim " << qk_head_dim
                              << " (v " << v_head_dim << ")";
  }
}

inline void CheckTensor(const char* name, const Tensor& x, DLDataType dtype) {
  const DLTensor* t = x.GetDLTensorPtr();
  if (t->dtype.code != dtype.code || t->dtype.bits != dtype.bits || t->dtype.lanes != dtype.lanes) {
    TVM_FFI_THROW(ValueError) << "tvm_attn KV-cache kernels: " << name << " has dtype " << DTypeName(t->dtype)
                              << ", the kernels were built for " << DTypeName(dtype);
  }
}

inline int64_t NumSMs(DLDevice dev) {
  static int64_t cached[64] = {0};
  int id = dev.device_id;
  if (id >= 0 && id < 64 && cached[id]) return cached[id];
  tvm::ffi::Any rv;
  tvm::runtime::DeviceAPI::Get(dev)->GetAttr(dev, tvm::runtime::kMultiProcessorCount, &rv);
  int64_t n = rv.cast<int64_t>();
  if (id >= 0 && id < 64) cached[id] = n;
  return n;
}

inline const int32_t* HostInt32(const char* name, const Tensor& x, int64_t n) {
  const DLTensor* t = x.GetDLTensorPtr();
  if (t->dtype.code != kDLInt || t->dtype.bits != 32 || t->ndim != 1 || t->shape[0] < n) {
    TVM_FFI_THROW(ValueError) << "tvm_attn plan: " << name << " must be a host int32 vector of at least " << n
                              << " entries";
  }
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) {
    TVM_FFI_THROW(ValueError) << "tvm_attn plan: " << name << " must be in host memory";
  }
  return reinterpret_cast<const int32_t*>(static_cast<const char*>(t->data) + t->byte_offset);
}

// The plan's layout, stored in plan_info after the PlanField values.
inline Layout LayoutOf(const Array<int64_t>& info) {
  if (static_cast<int64_t>(info.size()) != kNumPlanFields + Layout::kFields) {
    TVM_FFI_THROW(ValueError) << "tvm_attn run: plan_info has " << info.size() << " fields, expected "
                              << kNumPlanFields + Layout::kFields << " (was it made by tvm_attn's plan?)";
  }
  return Layout::Load(info, kNumPlanFields);
}

inline int64_t Bytes(const Tensor& x) {
  const DLTensor* t = x.GetDLTensorPtr();
  int64_t n = (t->dtype.bits * t->dtype.lanes + 7) / 8;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

// int32 arrays on 64-byte boundaries: TVM's compiled planner assumes that alignment of every array
// argument (its vector loads fault 8 bytes off it), which the cache's host arrays and a std::vector
// do not promise; the planner's index inputs are copied into one of these.
class AlignedInts {
 public:
  explicit AlignedInts(int64_t n) : raw_(n + kRegionAlign) {
    auto at = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + (kRegionAlign - (at / sizeof(int32_t)) % kRegionAlign) % kRegionAlign;
  }
  int32_t* data() { return data_; }

 private:
  std::vector<int32_t> raw_;
  int32_t* data_;
};

// Runs the planner into the page-locked int workspace and copies the result to the device.
Array<int64_t> Plan(int64_t kind, int64_t tile, const Tensor& float_ws, const Tensor& int_ws,
                    const Tensor& pinned_ws, const int32_t* qo_indptr, const int32_t* kv_indptr,
                    const int32_t* last_page_len, int64_t batch, int64_t page_size, bool allow_split,
                    bool causal) {
  DLDevice dev = int_ws.GetDLTensorPtr()->device;
  int64_t sms = NumSMs(dev);
  bool decode = kind == kKindDecode;
  Layout lay = decode ? DecodeLayout(sms, batch)
                      : PrefillLayout(sms, qo_indptr[batch], batch, kPrefillTiles[tile]);
  PlanParams params;  // the defaults: group and tile 1, no causal clipping, no window
  params.max_partials = lay.max_partials;
  params.page_size = page_size;
  params.allow_split = allow_split;
  if (decode) {
    params.work_overhead = kDecode.work_overhead;
    params.pack_slack_div = kDecode.pack_slack_div;
  } else {
    const PrefillTile& t = kPrefillTiles[tile];
    params.group_size = kNumQoHeads / kNumKvHeads;
    params.tile_q = t.tile_q;
    params.causal = causal;
    params.work_overhead = t.work_overhead;
    params.pack_slack_div = kPrefillPackSlackDiv;
    params.kv_heads = 1 + t.fold_heads * (kNumKvHeads - 1);
  }
  int64_t int_bytes = sizeof(int32_t) * lay.int_elems(), float_bytes = sizeof(float) * lay.float_elems();
  if (int_bytes > Bytes(int_ws) || int_bytes > Bytes(pinned_ws) || float_bytes > Bytes(float_ws)) {
    TVM_FFI_THROW(ValueError) << "tvm_attn plan: the step needs " << int_bytes << " bytes of int workspace and "
                              << float_bytes << " of float workspace; the cache has " << Bytes(int_ws) << " and "
                              << Bytes(float_ws) << " (" << batch << " requests, " << lay.max_rows
                              << " packed rows)";
  }
  DLDevice host{kDLCPU, 0};
  int32_t* pinned = static_cast<int32_t*>(pinned_ws.GetDLTensorPtr()->data);
  // the planner's inputs and stats, each region of `args` 64-byte aligned (as are the layout's)
  int64_t span = (batch + kRegionAlign) / kRegionAlign * kRegionAlign;  // batch + 1, aligned
  AlignedInts args(3 * span + kPlanStats);
  int32_t *qo_a = args.data(), *kv_a = qo_a + span, *last_a = kv_a + span, *stats = last_a + span;
  std::copy(qo_indptr, qo_indptr + batch + 1, qo_a);
  std::copy(kv_indptr, kv_indptr + batch + 1, kv_a);
  std::copy(last_page_len, last_page_len + batch, last_a);
  std::fill(stats, stats + kPlanStats, 0);
  View qo_v(qo_a, host, kInt32, {batch + 1});
  View kv_v(kv_a, host, kInt32, {batch + 1});
  View last_v(last_a, host, kInt32, {batch});
  View work_v = lay.work_info(pinned, host), cta_v = lay.cta_indptr(pinned, host);
  View merge_v = lay.merge_indptr(pinned, host);
  View stats_v(stats, host, kInt32, {kPlanStats});
  params.Call(kPlanner, qo_v.get(), kv_v.get(), last_v.get(), work_v.get(), cta_v.get(), merge_v.get(),
              stats_v.get());
  if (stats[kStatStatus] != kStatusOk) {
    TVM_FFI_THROW(InternalError) << "tvm_attn plan: the planner ran out of " << StatusName(stats[kStatStatus])
                                 << " (" << stats[kStatNumWorks] << " works, " << stats[kStatNumPartials]
                                 << " partial rows)";
  }
  // the decode kernel's merge counts start at zero (each launch leaves them zero)
  std::fill(pinned + lay.merge_count_at(), pinned + lay.int_elems(), 0);
  View src(pinned, host, kInt32, {lay.int_elems()});
  View dst(int_ws.GetDLTensorPtr()->data, dev, kInt32, {lay.int_elems()});
  dst.t.byte_offset = int_ws.GetDLTensorPtr()->byte_offset;
  tvm::runtime::DeviceAPI::Get(dev)->CopyDataFromTo(src.get(), dst.get(),
                                                 TVMFFIEnvGetStream(dev.device_type, dev.device_id));
  Array<int64_t> info;
  int64_t fields[kNumPlanFields] = {kind, tile, batch, stats[kStatNumPartials], static_cast<int64_t>(causal)};
  for (int64_t f : fields) info.push_back(f);
  lay.Save(&info);
  return info;
}

inline void CheckNoWindow(const char* what, int64_t window_left) {
  if (window_left >= 0) {
    TVM_FFI_THROW(ValueError) << what << ": tvm_attn's KV-cache kernels have no sliding window (window_left "
                              << window_left << "); the cache's sliding-window slots keep TVM's kernels";
  }
}

// enable_cuda_graph (FlashInfer's flag, which TVM 0.27's cache passes as false) changes nothing: a decode
// plan's layout is the batch's alone, and `run` never sizes anything per step (the header comment)
inline void CheckPlanArgs(const char* what, bool /*enable_cuda_graph*/, int64_t window_left) {
  CheckNoWindow(what, window_left);
}

// The tile for a batch: by the mean GQA-packed query rows of its non-empty requests.
inline int64_t ChooseTile(const int32_t* qo_indptr, int64_t batch) {
  int64_t tokens = 0, nonempty = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t n = qo_indptr[b + 1] - qo_indptr[b];
    tokens += n;
    nonempty += n > 0;
  }
  int64_t mean = nonempty ? tokens * (kNumQoHeads / kNumKvHeads) / nonempty : 0;
  int64_t n = static_cast<int64_t>(sizeof(kPrefillTiles) / sizeof(kPrefillTiles[0]));
  for (int64_t i = 0; i < n; ++i) {
    if (mean <= kPrefillTiles[i].max_mean_rows) return i;
  }
  return n - 1;
}

// The paged- and ragged-prefill slots' plan (FlashInfer's batch_prefill_plan arguments).
template <bool paged>
Array<int64_t> PlanPrefill(Tensor float_ws, Tensor int_ws, Tensor pinned_ws, Tensor qo_indptr_h, Tensor kv_indptr_h,
                           Tensor kv_len_h, int64_t total_qo_len, int64_t batch, int64_t num_qo_heads,
                           int64_t num_kv_heads, int64_t page_size, bool enable_cuda_graph, int64_t qk_head_dim,
                           int64_t v_head_dim, bool causal, int64_t window_left, int64_t fixed_split_size,
                           bool disable_split_kv, int64_t num_colocated_ctas) {
  const char* what = paged ? "tvm_attn paged-prefill plan" : "tvm_attn ragged-prefill plan";
  CheckConfig(what, num_qo_heads, num_kv_heads, qk_head_dim, v_head_dim);
  CheckPlanArgs(what, enable_cuda_graph, window_left);
  if (fixed_split_size > 0) {
    TVM_FFI_THROW(ValueError) << what << ": fixed_split_size is not supported (the planner sizes the pieces)";
  }
  if (paged && page_size != kPageSize) {
    TVM_FFI_THROW(ValueError) << what << ": the kernels were built for page size " << kPageSize << ", got "
                              << page_size;
  }
  const int32_t* qo = HostInt32("qo_indptr", qo_indptr_h, batch + 1);
  const int32_t* kv = HostInt32(paged ? "page_indptr" : "kv_indptr", kv_indptr_h, batch + 1);
  const int32_t* kv_len = HostInt32("kv_len", kv_len_h, batch);
  if (qo[batch] != total_qo_len) {
    TVM_FFI_THROW(ValueError) << what << ": qo_indptr ends at " << qo[batch] << ", total_qo_len is " << total_qo_len;
  }
  std::vector<int32_t> last(batch);
  for (int64_t b = 0; b < batch; ++b) {
    // ragged KV: rows are pages of one key; paged: the last page holds what the length leaves
    int64_t pages = kv[b + 1] - kv[b];
    last[b] = paged ? (pages ? static_cast<int32_t>(kv_len[b] - (pages - 1) * kPageSize) : 0) : 1;
    if (paged && pages && (last[b] <= 0 || last[b] > kPageSize)) {
      TVM_FFI_THROW(ValueError) << what << ": request " << b << " has " << pages << " pages but " << kv_len[b]
                                << " keys";
    }
  }
  bool decode = paged && batch > 0;
  for (int64_t b = 0; decode && b < batch; ++b) decode = qo[b + 1] - qo[b] == 1;
  if (decode) {
    return Plan(kKindDecode, 0, float_ws, int_ws, pinned_ws, qo, kv, last.data(), batch, kPageSize,
                !disable_split_kv, false);
  }
  return Plan(kKindPrefill, ChooseTile(qo, batch), float_ws, int_ws, pinned_ws, qo, kv, last.data(), batch,
              paged ? kPageSize : 1, !disable_split_kv, causal);
}

// The decode slot's plan sees page counts only: it plans every page full, and the decode kernel
// clips each piece to the request's length, which run passes on the device.
Array<int64_t> PlanDecode(Tensor float_ws, Tensor int_ws, Tensor pinned_ws, Tensor page_indptr_h, int64_t batch,
                          int64_t num_qo_heads, int64_t num_kv_heads, int64_t page_size, bool enable_cuda_graph,
                          int64_t window_left, double logits_soft_cap, int64_t qk_head_dim, int64_t v_head_dim,
                          Tensor empty_q, Tensor empty_kv) {
  const char* what = "tvm_attn decode plan";
  CheckConfig(what, num_qo_heads, num_kv_heads, qk_head_dim, v_head_dim);
  CheckPlanArgs(what, enable_cuda_graph, window_left);
  if (logits_soft_cap > 0) {
    TVM_FFI_THROW(ValueError) << what << ": logits_soft_cap is a variant of the kernels, not a plan option";
  }
  if (page_size != kPageSize) {
    TVM_FFI_THROW(ValueError) << what << ": the kernels were built for page size " << kPageSize << ", got "
                              << page_size;
  }
  CheckTensor("q", empty_q, kDType);
  CheckTensor("kv", empty_kv, kDType);
  const int32_t* kv = HostInt32("page_indptr", page_indptr_h, batch + 1);
  std::vector<int32_t> qo(batch + 1), last(batch);
  for (int64_t b = 0; b <= batch; ++b) qo[b] = static_cast<int32_t>(b);
  for (int64_t b = 0; b < batch; ++b) last[b] = kv[b + 1] > kv[b] ? kPageSize : 0;
  return Plan(kKindDecode, 0, float_ws, int_ws, pinned_ws, qo.data(), kv, last.data(), batch, kPageSize, true,
              false);
}

// The workspace views of a plan, on the device.
struct Workspace {
  View work, cta, merge, count, tmp_o, tmp_lse;
  Workspace(const Tensor& float_ws, const Tensor& int_ws, const Layout& lay)
      : work(lay.work_info(Ints(int_ws), Dev(int_ws))),
        cta(lay.cta_indptr(Ints(int_ws), Dev(int_ws))),
        merge(lay.merge_indptr(Ints(int_ws), Dev(int_ws))),
        count(lay.merge_count(Ints(int_ws), Dev(int_ws))),
        tmp_o(lay.tmp_o(Floats(float_ws), Dev(float_ws))),
        tmp_lse(lay.tmp_lse(Floats(float_ws), Dev(float_ws))) {}
  static char* Base(const Tensor& x) {
    const DLTensor* t = x.GetDLTensorPtr();
    return static_cast<char*>(t->data) + t->byte_offset;
  }
  static int32_t* Ints(const Tensor& x) { return reinterpret_cast<int32_t*>(Base(x)); }
  static float* Floats(const Tensor& x) { return reinterpret_cast<float*>(Base(x)); }
  static DLDevice Dev(const Tensor& x) { return x.GetDLTensorPtr()->device; }
};

// The cache's paged K and V views (pages[:, 0] and pages[:, 1]) -> the whole [P, 2, H, S, D] cache.
inline View Pages(const Tensor& k_view, const Tensor& v_view) {
  const DLTensor* k = k_view.GetDLTensorPtr();
  const DLTensor* v = v_view.GetDLTensorPtr();
  int64_t inner = kNumKvHeads * kPageSize * kHeadDim;
  int64_t elem = (k->dtype.bits * k->dtype.lanes + 7) / 8;
  char* base = static_cast<char*>(k->data) + k->byte_offset;
  char* vbase = static_cast<char*>(v->data) + v->byte_offset;
  bool hnd = k->ndim == 4 && k->shape[1] == kNumKvHeads && k->shape[2] == kPageSize && k->shape[3] == kHeadDim;
  bool interleaved = vbase == base + inner * elem &&
                     (k->strides == nullptr || (k->strides[0] == 2 * inner && k->strides[3] == 1));
  if (!hnd || !interleaved) {
    TVM_FFI_THROW(ValueError) << "tvm_attn run: expected the cache's K/V views of one [pages, 2, "
                              << kNumKvHeads << ", " << kPageSize << ", " << kHeadDim << "] tensor";
  }
  return View(base, k->device, k->dtype, {k->shape[0], 2, kNumKvHeads, kPageSize, kHeadDim});
}

void RunDecodeKernel(const Array<int64_t>& info, const Tensor& float_ws, const Tensor& int_ws, const Tensor& q,
                     View& pages, const Tensor& page_indptr, const Tensor& page_indices, const Tensor& length_info,
                     const Tensor& o, const Tensor& lse, double sm_scale) {
  Layout lay = LayoutOf(info);
  Workspace ws(float_ws, int_ws, lay);
  Rebased q_r(q), ip(page_indptr), ix(page_indices), len(length_info), o_r(o), lse_r(lse);
  if (q_r.t.ndim != 3 || q_r.t.shape[0] != info[kBatch]) {
    TVM_FFI_THROW(ValueError) << "tvm_attn decode run: q has " << q_r.t.shape[0] << " rows, the plan has "
                              << info[kBatch] << " requests";
  }
  Call(kDecode.kernel, q_r.get(), pages.get(), ip.get(), ix.get(), len.get(), ws.work.get(), ws.cta.get(),
       ws.tmp_o.get(), ws.tmp_lse.get(), ws.merge.get(), ws.count.get(), o_r.get(), lse_r.get(), sm_scale);
}

inline void CheckScale(double sm_scale) {
  // the kernels take the row max of unscaled logits and scale inside the exp2
  if (!(std::isfinite(sm_scale) && sm_scale > 0)) {
    TVM_FFI_THROW(ValueError) << "tvm_attn run: sm_scale must be a positive finite number, got " << sm_scale;
  }
}

inline int64_t CausalArg(const Array<int64_t>& info, int64_t mask_mode) {
  if (mask_mode != 0 && mask_mode != 1) {
    TVM_FFI_THROW(ValueError) << "tvm_attn run: mask_mode " << mask_mode << " (0: none, 1: causal; custom "
                              << "masks are variants of the kernels)";
  }
  if (info[kCausal] && !mask_mode) {
    TVM_FFI_THROW(ValueError) << "tvm_attn run: planned causal (keys clipped per tile), run without the mask; "
                              << "plan with causal=false";
  }
  return mask_mode;
}

// The plan's tensor-core prefill kernel (`kernel` of its tile) over the KV arguments `kv` (paged: pages,
// page indptr, indices, lengths; ragged: k, v, kv indptr), then the tile's merge when the plan cut a tile.
template <typename... KV>
void RunPrefillKernel(Kernel kernel, Kernel merge, const Array<int64_t>& plan_info, const Layout& lay,
                      int64_t mask_mode, const Tensor& float_ws, const Tensor& int_ws, const Tensor& q,
                      const Tensor& qo_indptr, const Tensor& o, const Tensor& lse, double sm_scale, KV*... kv) {
  const PrefillTile& t = kPrefillTiles[plan_info[kTile]];
  int64_t causal = CausalArg(plan_info, mask_mode);
  Workspace ws(float_ws, int_ws, lay);
  Rebased q_r(q), qo(qo_indptr), o_r(o), lse_r(lse);
  Call(t.*kernel, q_r.get(), qo.get(), kv..., ws.work.get(), ws.cta.get(), ws.tmp_o.get(), ws.tmp_lse.get(),
       o_r.get(), lse_r.get(), sm_scale, causal);
  if (plan_info[kNumPartials] > 0) {
    Call(t.*merge, ws.merge.get(), ws.tmp_o.get(), ws.tmp_lse.get(), o_r.get(), lse_r.get(), causal);
  }
}

void RunPaged(Tensor float_ws, Tensor int_ws, Array<int64_t> plan_info, Tensor q, Tensor k_view, Tensor v_view,
              Tensor qo_indptr, Tensor page_indptr, Tensor page_indices, Tensor length_info, Tensor o, Tensor lse,
              int64_t mask_mode, int64_t layout, int64_t window_left, bool enable_pdl, double sm_scale,
              double rope_rcp_scale, double rope_rcp_theta) {
  CheckScale(sm_scale);
  CheckNoWindow("tvm_attn paged run", window_left);
  if (layout != 1) TVM_FFI_THROW(ValueError) << "tvm_attn paged run: the cache's pages are HND (layout 1)";
  CheckTensor("q", q, kDType);
  CheckTensor("pages", k_view, kDType);
  View pages = Pages(k_view, v_view);
  Layout lay = LayoutOf(plan_info);
  if (plan_info[kKind] == kKindDecode) {
    RunDecodeKernel(plan_info, float_ws, int_ws, q, pages, page_indptr, page_indices, length_info, o, lse,
                    sm_scale);
    return;
  }
  Rebased ip(page_indptr), ix(page_indices), len(length_info);
  RunPrefillKernel(&PrefillTile::paged, &PrefillTile::paged_merge, plan_info, lay, mask_mode, float_ws, int_ws, q,
                   qo_indptr, o, lse, sm_scale, pages.get(), ip.get(), ix.get(), len.get());
}

void RunRagged(Tensor float_ws, Tensor int_ws, Array<int64_t> plan_info, Tensor q, Tensor k, Tensor v,
               Tensor qo_indptr, Tensor kv_indptr, Tensor o, Tensor lse, int64_t mask_mode, int64_t layout,
               int64_t window_left, bool enable_pdl, double sm_scale, double rope_rcp_scale,
               double rope_rcp_theta) {
  CheckScale(sm_scale);
  CheckNoWindow("tvm_attn ragged run", window_left);
  if (layout != 0) TVM_FFI_THROW(ValueError) << "tvm_attn ragged run: k/v must be NHD (layout 0)";
  CheckTensor("q", q, kDType);
  CheckTensor("k", k, kDType);
  CheckTensor("v", v, kDType);
  Layout lay = LayoutOf(plan_info);
  if (plan_info[kKind] != kKindPrefill) TVM_FFI_THROW(ValueError) << "tvm_attn ragged run: not a prefill plan";
  Rebased k_r(k), v_r(v), ip(kv_indptr);
  RunPrefillKernel(&PrefillTile::ragged, &PrefillTile::ragged_merge, plan_info, lay, mask_mode, float_ws, int_ws, q,
                   qo_indptr, o, lse, sm_scale, k_r.get(), v_r.get(), ip.get());
}

void RunDecode(Tensor float_ws, Tensor int_ws, Array<int64_t> plan_info, Tensor q, Tensor k_view, Tensor v_view,
               Tensor page_indptr, Tensor page_indices, Tensor length_info, Tensor o, Tensor lse, int64_t layout,
               int64_t window_left, bool enable_pdl, double sm_scale, double rope_rcp_scale,
               double rope_rcp_theta) {
  CheckScale(sm_scale);
  CheckNoWindow("tvm_attn decode run", window_left);
  if (layout != 1) TVM_FFI_THROW(ValueError) << "tvm_attn decode run: the cache's pages are HND (layout 1)";
  CheckTensor("q", q, kDType);
  CheckTensor("pages", k_view, kDType);
  LayoutOf(plan_info);  // refuses a plan_info of another size
  if (plan_info[kKind] != kKindDecode) {
    TVM_FFI_THROW(ValueError) << "tvm_attn decode run: not a decode plan";
  }
  View pages = Pages(k_view, v_view);
  RunDecodeKernel(plan_info, float_ws, int_ws, q, pages, page_indptr, page_indices, length_info, o, lse,
                  sm_scale);
}

}  // namespace tvm_attn_kv

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tvm_attn_kv_plan_paged, tvm_attn_kv::PlanPrefill<true>);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tvm_attn_kv_plan_ragged, tvm_attn_kv::PlanPrefill<false>);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tvm_attn_kv_plan_decode, tvm_attn_kv::PlanDecode);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tvm_attn_kv_run_paged, tvm_attn_kv::RunPaged);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tvm_attn_kv_run_ragged, tvm_attn_kv::RunRagged);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tvm_attn_kv_run_decode, tvm_attn_kv::RunDecode);
