// An mf-edge ExecuTorch output folder: the program, its input, its preprocessing and its labels.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace mf {

// The eval transform written in manifest.json's "preprocessing" (mf_edge.manifest.preprocessing_dict).
struct Preprocessing {
  int resize_shorter_side = 0;
  int center_crop = 0;
  std::string interpolation;
  float scale = 1.0f / 255.0f;
  std::array<float, 3> mean{};
  std::array<float, 3> std{};
};

struct ModelFolder {
  std::string program;              // path of model.pte
  std::string model;                // e.g. convformer_s18
  std::string precision;            // fp32, int8, ...
  std::array<int64_t, 4> input_shape{};  // [B, 3, H, W]; B is the maximum when dynamic_batch
  bool dynamic_batch = false;
  int num_classes = 0;
  Preprocessing preprocessing;
  std::vector<std::string> labels;  // labels.txt, or "class i"
};

// Reads FOLDER/manifest.json (and labels.txt); a folder that is not an ExecuTorch one throws UserError.
ModelFolder read_model_folder(const std::string& folder);

}  // namespace mf
