#include "manifest.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "errors.h"

namespace mf {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "mf-edge-manifest/1";

json load_json(const fs::path& path) {
  std::ifstream stream(path);
  if (!stream) throw UserError("cannot read " + path.string());
  try {
    return json::parse(stream);
  } catch (const json::parse_error& error) {
    throw UserError(path.string() + " is not valid JSON (" + error.what() + "); convert the model again");
  }
}

std::string wrong_target(const std::string& folder, const std::string& target) {
  std::string message = folder + " holds a " + target + " artifact; mf-classify runs ExecuTorch folders "
                        "(mf-edge convert MODEL --target executorch)";
  if (target == "coreml") message += "; for Core ML on a Mac or iPhone see docs/deploy/ios.md";
  if (target == "tensorrt") message += "; for TensorRT see docs/deploy/jetson.md";
  if (target == "onnx") message += "; run ONNX with apps/classify/classify.py";
  return message;
}

std::array<float, 3> three_floats(const json& value) {
  const auto numbers = value.get<std::vector<double>>();
  if (numbers.size() != 3) throw UserError("mean and std need 3 values, one per RGB channel");
  return {static_cast<float>(numbers[0]), static_cast<float>(numbers[1]), static_cast<float>(numbers[2])};
}

std::vector<std::string> read_labels(const fs::path& path, int num_classes) {
  std::vector<std::string> labels;
  std::ifstream stream(path);
  for (std::string line; stream && std::getline(stream, line);) labels.push_back(line);
  if (static_cast<int>(labels.size()) != num_classes) {
    labels.clear();
    for (int i = 0; i < num_classes; ++i) labels.push_back("class " + std::to_string(i));
  }
  return labels;
}

}  // namespace

ModelFolder read_model_folder(const std::string& folder) {
  const fs::path root(folder);
  if (!fs::is_directory(root)) {
    throw UserError("output folder " + folder + " does not exist; pass a folder written by mf-edge convert");
  }
  const fs::path manifest_path = root / "manifest.json";
  if (!fs::is_regular_file(manifest_path)) {
    throw UserError(folder + " has no manifest.json; pass an output folder written by mf-edge convert");
  }
  const json manifest = load_json(manifest_path);
  if (!manifest.is_object() || manifest.value("format", "") != kFormat) {
    throw UserError(manifest_path.string() + " is not an mf-edge manifest (" + kFormat + "); convert again");
  }
  try {
    const std::string target = manifest.at("target").get<std::string>();
    if (target != "executorch") throw UserError(wrong_target(folder, target));
    ModelFolder result;
    result.program = (root / manifest.at("artifact").get<std::string>()).string();
    if (!fs::is_regular_file(result.program)) {
      throw UserError(folder + " has no " + manifest.at("artifact").get<std::string>() + "; convert again");
    }
    result.model = manifest.at("model").value("name", "model");
    result.precision = manifest.value("precision", "");
    const json& input = manifest.at("input");
    const auto shape = input.at("shape").get<std::vector<int64_t>>();
    if (shape.size() != 4 || shape[1] != 3) throw UserError("manifest input shape is not [B, 3, H, W]");
    std::copy(shape.begin(), shape.end(), result.input_shape.begin());
    result.dynamic_batch = input.value("dynamic_batch", false);
    result.num_classes = manifest.at("output").at("shape").at(1).get<int>();

    const json& prep = manifest.at("preprocessing");
    Preprocessing& p = result.preprocessing;
    p.resize_shorter_side = prep.at("resize_shorter_side").get<int>();
    p.center_crop = prep.at("center_crop").get<int>();
    p.interpolation = prep.at("interpolation").get<std::string>();
    p.scale = static_cast<float>(prep.at("scale").get<double>());
    p.mean = three_floats(prep.at("mean"));
    p.std = three_floats(prep.at("std"));
    if (p.center_crop != shape[2] || p.center_crop != shape[3]) {
      throw UserError("manifest center_crop " + std::to_string(p.center_crop) + " is not the input size");
    }
    result.labels = read_labels(root / "labels.txt", result.num_classes);
    return result;
  } catch (const json::exception& error) {
    throw UserError(manifest_path.string() + " lacks a field mf-classify needs (" + error.what() +
                    "); convert the model again");
  }
}

}  // namespace mf
