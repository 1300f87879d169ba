// The manifest's eval transform, as torchvision's on a PIL image: shorter-side resize, centre crop,
// scale to [0, 1], normalise by mean/std, HWC to CHW.
#pragma once

#include <vector>

#include "image.h"
#include "manifest.h"

namespace mf {

// Appends the normalised float32 [3, H, W] planes of `image` to `out`.
void preprocess(const RgbImage& image, const Preprocessing& prep, std::vector<float>* out);

}  // namespace mf
