// Runs a model built by `tvm-attn build-model` from C++, with no Python: loads the exported library,
// creates TVM's runtime paged KV cache (whose attention slots hold tvm_attn's kernels), prefills
// three sequences in one batch, forks one of them (shared prefix) and decodes, all through packed
// functions.
//
//   run_model <model.so> <model.params> <prompt_len>... [--steps N] [--expect logits.bin [--tol T]]
//
// model.params: the weights in call order under the keys param_0000, param_0001, ...
// (tvm.runtime.save_param_dict_to_file, as `tvm-attn build-model --save-params` writes them).
// Tokens are deterministic so the reference can replay them: prompt token j of sequence i is
// (31 i + 7 j + 1) % vocab, the decode token of step k for sequence i is (17 k + 5 i + 3) % vocab.
// --expect: the logits this run must produce (examples/cpp/expected_logits.py writes them from the
// numpy forward pass): float32, one row of vocab values per report below (the last new token of each
// sequence after the prefill, then of every sequence at every decode step), in that order. The run
// fails (exit 1) if any logit is off by more than T * (1 + max |expected|) (T default 1e-4).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

namespace {

ffi::Function Global(const char* name) {
  ffi::Optional<ffi::Function> f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) {
    std::cerr << "TVM runtime function " << name << " is not registered\n";
    std::exit(2);
  }
  return f.value();
}

// Host memory for the tensors this program makes (64-byte aligned, as TVM's own allocator).
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

Tensor TokenTensor(const std::vector<int32_t>& ids, int64_t rows, int64_t cols) {
  Tensor t = Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape({rows, cols}), DLDataType{kDLInt, 32, 1},
                                 DLDevice{kDLCPU, 0});
  std::memcpy(t.data_ptr(), ids.data(), ids.size() * sizeof(int32_t));
  return t;
}

ffi::Array<Tensor> LoadWeights(const std::string& path) {
  auto params = Global("runtime.LoadParamsFromFile")(ffi::String(path)).cast<ffi::Map<ffi::String, Tensor>>();
  ffi::Array<Tensor> ordered;
  for (size_t i = 0; i < params.size(); ++i) {
    char key[32];
    std::snprintf(key, sizeof(key), "param_%04zu", i);
    auto it = params.find(ffi::String(key));
    if (it == params.end()) {
      std::cerr << path << ": no weight " << key << " (the file must hold param_0000 .. in call order)\n";
      std::exit(2);
    }
    ordered.push_back((*it).second);
  }
  return ordered;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: run_model <model.so> <model.params> <prompt_len>... [--steps N] [--out file]\n";
    return 2;
  }
  std::vector<int64_t> prompt_lens;
  int steps = 8;
  std::string expect_path;
  double tol = 1e-4;
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (a == "--expect" && i + 1 < argc) {
      expect_path = argv[++i];
    } else if (a == "--tol" && i + 1 < argc) {
      tol = std::atof(argv[++i]);
    } else {
      prompt_lens.push_back(std::atoll(a.c_str()));
    }
  }
  // The Relax VM executable inside the library, initialised for the CPU (pooled allocator).
  // dlopen reads a name without a slash as a library to search for, not as a file here
  std::string library = argv[1];
  if (library.find('/') == std::string::npos) library = "./" + library;
  ffi::Module exec = ffi::Module::LoadFromFile(library);
  ffi::Module vm = exec->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2, static_cast<int>(kDLCPU), 0, 2);
  ffi::Function prefill = vm->GetFunction("prefill").value();
  ffi::Function decode = vm->GetFunction("decode").value();
  ffi::Array<Tensor> weights = LoadWeights(argv[2]);

  ffi::Any cache = vm->GetFunction("create_paged_kv_cache").value()(ffi::Shape({8}), ffi::Shape({4096}),
                                                                    ffi::Shape({2048}));
  ffi::Function add = Global("vm.builtin.kv_state_add_sequence");
  ffi::Function fork = Global("vm.builtin.kv_state_fork_sequence");
  ffi::Function begin = Global("vm.builtin.kv_state_begin_forward");
  ffi::Function end = Global("vm.builtin.kv_state_end_forward");

  std::ifstream expect;
  if (!expect_path.empty()) {
    expect.open(expect_path, std::ios::binary);
    if (!expect) {
      std::cerr << expect_path << ": cannot be read\n";
      return 2;
    }
  }
  double worst = 0, worst_bound = 0;  // the largest error, and the limit of the row it is in
  int bad_rows = 0;
  auto report = [&](int step, int64_t seq, const Tensor& logits, int64_t row) -> void {
    int64_t vocab = logits.size(-1);
    const float* r = static_cast<const float*>(logits.data_ptr()) + row * vocab;  // float32, on the CPU
    int64_t best = 0;
    for (int64_t v = 1; v < vocab; ++v) best = r[v] > r[best] ? v : best;
    std::cout << "step " << step << " seq " << seq << " argmax " << best << " logit " << r[best] << "\n";
    if (!expect.is_open()) return;
    std::vector<float> ref(vocab);
    if (!expect.read(reinterpret_cast<char*>(ref.data()), vocab * sizeof(float))) {
      std::cerr << expect_path << ": too short for step " << step << " seq " << seq << "\n";
      std::exit(2);
    }
    double err = 0, scale = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      err = std::max(err, static_cast<double>(std::fabs(r[v] - ref[v])));
      scale = std::max(scale, static_cast<double>(std::fabs(ref[v])));
    }
    double bound = tol * (1 + scale);
    if (!(err <= bound)) ++bad_rows;  // (a NaN counts as bad)
    if (!(err <= worst)) {
      worst = err;
      worst_bound = bound;
    }
  };

  // Prefill: every prompt in one batch, laid end to end.
  std::vector<int64_t> seq_ids;
  std::vector<int32_t> tokens;
  // The vocabulary size: rows of the embedding table, the first weight (model.embed_tokens.weight).
  const int64_t vocab = weights[0].size(0);
  for (size_t i = 0; i < prompt_lens.size(); ++i) {
    seq_ids.push_back(static_cast<int64_t>(i));
    add(cache, static_cast<int64_t>(i));
    for (int64_t j = 0; j < prompt_lens[i]; ++j) tokens.push_back(static_cast<int32_t>((31 * i + 7 * j + 1) % vocab));
  }
  begin(cache, ffi::Shape(seq_ids), ffi::Shape(prompt_lens));
  Tensor logits = prefill(TokenTensor(tokens, 1, tokens.size()), cache, weights).cast<Tensor>();
  end(cache);
  int64_t row = -1;
  for (size_t i = 0; i < prompt_lens.size(); ++i) {
    row += prompt_lens[i];
    report(0, seq_ids[i], logits, row);
  }

  // Fork: a new sequence continues sequence 0's whole prompt, sharing its pages.
  int64_t child = static_cast<int64_t>(prompt_lens.size());
  fork(cache, int64_t{0}, child, int64_t{-1});
  seq_ids.push_back(child);

  for (int step = 1; step <= steps; ++step) {
    std::vector<int32_t> ids;
    for (int64_t s : seq_ids) ids.push_back(static_cast<int32_t>((17 * step + 5 * s + 3) % vocab));
    begin(cache, ffi::Shape(seq_ids), ffi::Shape(std::vector<int64_t>(seq_ids.size(), 1)));
    logits = decode(TokenTensor(ids, ids.size(), 1), cache, weights).cast<Tensor>();
    end(cache);
    for (size_t i = 0; i < seq_ids.size(); ++i) report(step, seq_ids[i], logits, static_cast<int64_t>(i));
  }
  if (expect.is_open()) {
    if (expect.peek() != std::ifstream::traits_type::eof()) {
      std::cerr << expect_path << ": holds more rows than this run reports (other prompt lengths or steps?)\n";
      return 2;
    }
    std::cout << "max |logits - expected| " << worst << " (limit " << worst_bound << ")\n";
    if (bad_rows) {
      std::cerr << "logits differ from " << expect_path << " in " << bad_rows << " rows\n";
      return 1;
    }
  }
  std::cout << "ok: " << prompt_lens.size() << " sequences + 1 fork, " << steps << " decode steps"
            << (expect.is_open() ? ", logits match the expected ones" : "") << "\n";
  return 0;
}
