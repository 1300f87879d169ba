#include "report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <string>

#include <nlohmann/json.hpp>

namespace mf {

namespace {

struct Ranked {
  int index;
  double probability;
  float logit;
};

std::vector<Ranked> top_classes(const std::vector<float>& logits, int top) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0;
  for (float logit : logits) total += std::exp(static_cast<double>(logit) - max_logit);
  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const size_t count = std::min(order.size(), static_cast<size_t>(top));
  std::partial_sort(order.begin(), order.begin() + count, order.end(),
                    [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  std::vector<Ranked> ranked;
  for (size_t i = 0; i < count; ++i) {
    const int k = order[i];
    ranked.push_back({k, std::exp(static_cast<double>(logits[k]) - max_logit) / total, logits[k]});
  }
  return ranked;
}

}  // namespace

double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // "VmHWM:  1234 kB"
  }
  return -1;
}

void print_results(const std::vector<ImageResult>& results, const std::vector<std::string>& labels, int top,
                   bool json) {
  nlohmann::ordered_json document = nlohmann::ordered_json::array();
  for (const ImageResult& result : results) {
    const auto ranked = top_classes(result.logits, top);
    if (json) {
      nlohmann::ordered_json entries = nlohmann::ordered_json::array();
      for (const Ranked& r : ranked) {
        entries.push_back({{"index", r.index}, {"label", labels[r.index]}, {"probability", r.probability},
                           {"logit", r.logit}});
      }
      document.push_back({{"image", result.image},
                          {"top", entries},
                          {"batch", result.batch},
                          {"latency_ms", {{"median", result.latency.median_ms},
                                          {"min", result.latency.min_ms},
                                          {"max", result.latency.max_ms},
                                          {"runs", result.latency.runs},
                                          {"times", result.latency.times_ms}}},
                          {"load_ms", result.load_ms},
                          {"peak_rss_mb", peak_rss_mb()}});
      continue;
    }
    std::printf("%s\n", result.image.c_str());
    for (size_t i = 0; i < ranked.size(); ++i) {
      const Ranked& r = ranked[i];
      std::printf("  %zu. %-30s %.3f  (index %d, logit %.3f)\n", i + 1, labels[r.index].c_str(), r.probability,
                  r.index, r.logit);
    }
    std::printf("  latency: %.3f ms median of %d runs (batch %lld)\n", result.latency.median_ms, result.latency.runs,
                static_cast<long long>(result.batch));
  }
  if (json) std::cout << document.dump(2) << std::endl;
}

}  // namespace mf
