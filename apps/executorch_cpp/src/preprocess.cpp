#include "preprocess.h"

#include <cmath>

#include "errors.h"
#include "resample.h"

namespace mf {

void preprocess(const RgbImage& image, const Preprocessing& prep, std::vector<float>* out) {
  // torchvision's Resize(int): the shorter side to `short_side`, the longer one scaled and truncated.
  const int short_side = prep.resize_shorter_side;
  const bool portrait = image.width <= image.height;
  const int shorter = portrait ? image.width : image.height;
  const int longer = portrait ? image.height : image.width;
  const int scaled = static_cast<int>(static_cast<double>(static_cast<int64_t>(short_side) * longer) / shorter);
  const int width = portrait ? short_side : scaled;
  const int height = portrait ? scaled : short_side;
  const int crop_size = prep.center_crop;
  if (width < crop_size || height < crop_size) {
    throw UserError("the manifest crops " + std::to_string(crop_size) + " px out of a " + std::to_string(short_side) +
                    " px resize; convert the model again");
  }
  const RgbImage resized = resize(image, width, height, prep.interpolation);
  // CenterCrop's anchor: Python's round(), which rounds halves to even, as nearbyint does.
  const int top = static_cast<int>(std::nearbyint((height - crop_size) / 2.0));
  const int left = static_cast<int>(std::nearbyint((width - crop_size) / 2.0));
  const RgbImage cropped = crop(resized, left, top, crop_size, crop_size);

  // ToDtype(float32, scale=True) multiplies by 1/255 in float32; Normalize subtracts, then divides.
  const size_t plane = static_cast<size_t>(crop_size) * crop_size;
  const size_t start = out->size();
  out->resize(start + 3 * plane);
  for (int ch = 0; ch < 3; ++ch) {
    float* dst = out->data() + start + ch * plane;
    for (size_t i = 0; i < plane; ++i) {
      const float value = static_cast<float>(cropped.pixels[i * 3 + ch]) * prep.scale;
      dst[i] = (value - prep.mean[ch]) / prep.std[ch];
    }
  }
}

}  // namespace mf
