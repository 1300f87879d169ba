#include "classifier.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

#include "errors.h"
#include "threadpool.h"

namespace mf {

namespace {

using executorch::extension::module::Module;
using executorch::runtime::Error;

std::string& last_runtime_error() {
  static std::string message;
  return message;
}

// The runtime's log goes to stderr by default; keep its last error for the one-line message instead.
void capture_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t, const char* message,
                 size_t length) {
  if (level == kError || level == kFatal) {
    last_runtime_error().assign(message, length);
    while (!last_runtime_error().empty() && last_runtime_error().back() == '\n') last_runtime_error().pop_back();
  }
}

[[noreturn]] void fail(const std::string& what, Error error) {
  std::string message = what + " (ExecuTorch error " + executorch::runtime::to_string(error);
  if (!last_runtime_error().empty()) message += ": " + last_runtime_error();
  throw UserError(message + ")");
}

double milliseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Classifier::Classifier(const ModelFolder& folder, int threads) : folder_(folder) {
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(capture_log, __FILE__));
  if (threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  const auto start = std::chrono::steady_clock::now();
  module_ = std::make_unique<Module>(folder_.program, Module::LoadMode::Mmap);
  if (const Error error = module_->load_forward(); error != Error::Ok) {
    fail("cannot load " + folder_.program + "; convert the model again with this ExecuTorch version", error);
  }
  load_ms_ = milliseconds_since(start);
  // A dynamic-batch program's input is planned for its largest batch: that is the size its meta reports.
  max_batch_ = folder_.input_shape[0];
  if (folder_.dynamic_batch) {
    const auto meta = module_->method_meta("forward");
    if (meta.ok() && meta->num_inputs() > 0) {
      const auto input = meta->input_tensor_meta(0);
      if (input.ok() && !input->sizes().empty()) max_batch_ = std::max<int64_t>(max_batch_, input->sizes()[0]);
    }
  }
}

Classifier::~Classifier() = default;

BatchResult Classifier::run(const float* batch, int64_t n, int warmup, int runs) {
  const auto& shape = folder_.input_shape;
  const int64_t rows = folder_.dynamic_batch ? n : shape[0];
  const size_t image_floats = static_cast<size_t>(shape[1] * shape[2] * shape[3]);
  // A static program takes exactly its batch: pad with copies of the first image.
  std::vector<float> input(static_cast<size_t>(rows) * image_floats);
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(input.data() + i * image_floats, batch + (i < n ? i : 0) * image_floats, image_floats * sizeof(float));
  }
  auto tensor = executorch::extension::from_blob(
      input.data(), {static_cast<int32_t>(rows), static_cast<int32_t>(shape[1]), static_cast<int32_t>(shape[2]),
                     static_cast<int32_t>(shape[3])});
  BatchResult result;
  result.batch = rows;
  std::vector<double> times;
  for (int i = 0; i < warmup + runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    auto outputs = module_->forward(tensor);
    const double elapsed = milliseconds_since(start);
    if (!outputs.ok()) fail("running " + folder_.program + " failed", outputs.error());
    if (i < warmup) continue;
    times.push_back(elapsed);
    if (result.logits.empty()) {
      const auto& logits = outputs->at(0).toTensor();
      if (logits.dim() != 2 || logits.size(0) != rows || logits.size(1) != folder_.num_classes) {
        throw UserError("the program's output is not [" + std::to_string(rows) + ", " +
                        std::to_string(folder_.num_classes) + "] logits as the manifest says; convert again");
      }
      const float* data = logits.const_data_ptr<float>();
      result.logits.assign(data, data + n * folder_.num_classes);
    }
  }
  result.latency.times_ms = times;
  std::sort(times.begin(), times.end());
  const size_t mid = times.size() / 2;
  result.latency.median_ms = times.size() % 2 ? times[mid] : (times[mid - 1] + times[mid]) / 2;
  result.latency.min_ms = times.front();
  result.latency.max_ms = times.back();
  result.latency.runs = runs;
  return result;
}

}  // namespace mf
