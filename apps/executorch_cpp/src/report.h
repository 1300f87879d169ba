// Top-K classes of each image, printed as text or JSON.
#pragma once

#include <string>
#include <vector>

#include "classifier.h"

namespace mf {

struct ImageResult {
  std::string image;
  std::vector<float> logits;  // [num_classes]
  Latency latency;            // of the batch the image ran in
  int64_t batch = 0;
  double load_ms = 0;         // of the program
};

// The process's peak resident memory in MiB (Linux VmHWM, this program's own after exec), or -1 elsewhere.
double peak_rss_mb();

// Prints each image's `top` classes (index, label, softmax probability, logit) and its batch's latency.
void print_results(const std::vector<ImageResult>& results, const std::vector<std::string>& labels, int top,
                   bool json);

}  // namespace mf
