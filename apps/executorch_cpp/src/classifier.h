// An ExecuTorch program classifying normalised float32 NCHW batches, with its latency.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.h"

namespace executorch::extension::module {
class Module;
}

namespace mf {

struct Latency {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  int runs = 0;
  std::vector<double> times_ms;  // every timed run, in order
};

struct BatchResult {
  std::vector<float> logits;  // [n, num_classes]
  Latency latency;
  int64_t batch = 0;          // the batch size the program ran (a static program's images are padded to it)
};

class Classifier {
 public:
  // Loads `folder.program`; `threads` > 0 sizes the thread pool XNNPACK runs on.
  Classifier(const ModelFolder& folder, int threads);
  ~Classifier();

  // Milliseconds the program took to load (file, method, XNNPACK delegate initialisation).
  double load_ms() const { return load_ms_; }

  // The largest batch one call takes: the program's batch (its maximum for a dynamic-batch program).
  int64_t max_batch() const { return max_batch_; }

  // Logits of the `n` images in `batch` (n <= max_batch()), running the program `warmup` + `runs` times.
  BatchResult run(const float* batch, int64_t n, int warmup, int runs);

 private:
  ModelFolder folder_;
  int64_t max_batch_ = 1;
  double load_ms_ = 0;
  std::unique_ptr<executorch::extension::module::Module> module_;
};

}  // namespace mf
