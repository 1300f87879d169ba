// mf-classify: classify images with an mf-edge ExecuTorch output folder. See ../README.md.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "classifier.h"
#include "errors.h"
#include "image.h"
#include "manifest.h"
#include "options.h"
#include "preprocess.h"
#include "report.h"
#include "resample.h"

namespace {

using namespace mf;

// A raw float32 NCHW file: as many images of the program's [3, H, W] as its size holds.
std::vector<float> read_tensor(const std::string& path, size_t image_floats) {
  if (!std::filesystem::is_regular_file(path)) throw UserError("tensor file " + path + " does not exist");
  const auto bytes = std::filesystem::file_size(path);
  const size_t image_bytes = image_floats * sizeof(float);
  if (bytes == 0 || bytes % image_bytes) {
    throw UserError("tensor file " + path + " holds " + std::to_string(bytes) + " bytes, not a whole number of " +
                    std::to_string(image_bytes) + "-byte float32 [3, H, W] images this program takes");
  }
  std::vector<float> data(bytes / sizeof(float));
  std::ifstream stream(path, std::ios::binary);
  if (!stream.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(bytes))) {
    throw UserError("cannot read tensor file " + path);
  }
  return data;
}

void write_tensor(const std::string& path, const std::vector<float>& data) {
  std::ofstream stream(path, std::ios::binary);
  stream.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!stream) throw UserError("cannot write " + path);
}

int run(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  const ModelFolder folder = read_model_folder(options.folder);
  if (!is_known_interpolation(folder.preprocessing.interpolation)) {
    throw UserError("unknown interpolation '" + folder.preprocessing.interpolation + "' in the manifest");
  }
  const auto& shape = folder.input_shape;
  const size_t image_floats = static_cast<size_t>(shape[1] * shape[2] * shape[3]);

  std::vector<float> inputs;
  std::vector<std::string> names;
  if (!options.tensor.empty()) {
    inputs = read_tensor(options.tensor, image_floats);
    for (size_t i = 0; i < inputs.size() / image_floats; ++i) names.push_back(options.tensor + "[" + std::to_string(i) + "]");
  } else {
    for (const std::string& path : options.images) preprocess(decode_image(path), folder.preprocessing, &inputs);
    names = options.images;
  }
  if (!options.save_input.empty()) write_tensor(options.save_input, inputs);

  Classifier classifier(folder, options.threads);
  std::vector<ImageResult> results;
  const int64_t count = static_cast<int64_t>(names.size());
  for (int64_t start = 0; start < count; start += classifier.max_batch()) {
    const int64_t n = std::min(classifier.max_batch(), count - start);
    const BatchResult batch = classifier.run(inputs.data() + start * image_floats, n, options.warmup, options.runs);
    for (int64_t i = 0; i < n; ++i) {
      const float* row = batch.logits.data() + i * folder.num_classes;
      results.push_back({names[start + i], std::vector<float>(row, row + folder.num_classes), batch.latency,
                         batch.batch, classifier.load_ms()});
    }
  }
  print_results(results, folder.labels, options.top, options.json);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const mf::UserError& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
  }
  return 1;
}
