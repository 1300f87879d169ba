#include "image.h"

#include <csetjmp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "errors.h"

namespace mf {

namespace {

using File = std::unique_ptr<FILE, int (*)(FILE*)>;

File open_file(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) {
    throw UserError("image " + path + " does not exist; pass an existing JPEG or PNG file");
  }
  File file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw UserError("cannot open image " + path);
  return file;
}

// libjpeg reports errors through a callback that must not return: jump back to decode_jpeg.
struct JpegError {
  jpeg_error_mgr manager;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_jpeg_error(j_common_ptr info) {
  auto* error = reinterpret_cast<JpegError*>(info->err);
  (*info->err->format_message)(info, error->message);
  std::longjmp(error->jump, 1);
}

// Warnings stay quiet, but a file that ends early is an error, as in Pillow ("image file is truncated");
// libjpeg would fill the rest of the image with grey.
void on_jpeg_message(j_common_ptr info, int level) {
  if (level < 0 && info->err->msg_code == JWRN_JPEG_EOF) on_jpeg_error(info);
}

RgbImage decode_jpeg(const std::string& path) {
  File file = open_file(path);
  jpeg_decompress_struct info{};
  JpegError error{};
  info.err = jpeg_std_error(&error.manager);
  error.manager.error_exit = on_jpeg_error;
  error.manager.emit_message = on_jpeg_message;
  RgbImage image;
  if (setjmp(error.jump)) {
    jpeg_destroy_decompress(&info);
    throw UserError("cannot decode JPEG " + path + " (" + error.message + ")");
  }
  jpeg_create_decompress(&info);
  jpeg_stdio_src(&info, file.get());
  jpeg_read_header(&info, TRUE);
  if (info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&info);
    throw UserError("JPEG " + path + " is CMYK; convert it to RGB first");
  }
  info.out_color_space = JCS_RGB;  // greyscale is replicated to R, G and B, as PIL's convert("RGB") does
  jpeg_start_decompress(&info);
  image.width = static_cast<int>(info.output_width);
  image.height = static_cast<int>(info.output_height);
  image.pixels.resize(static_cast<size_t>(image.width) * image.height * 3);
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = image.pixels.data() + static_cast<size_t>(info.output_scanline) * image.width * 3;
    jpeg_read_scanlines(&info, &row, 1);
  }
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  return image;
}

// libpng prints its errors and warnings on stderr by default: keep the error for the one-line message and
// drop the warnings (such as an iCCP profile it dislikes), which Pillow ignores too.
void on_png_error(png_structp png, png_const_charp message) {
  static_cast<std::string*>(png_get_error_ptr(png))->assign(message);
  png_longjmp(png, 1);
}

void on_png_warning(png_structp, png_const_charp) {}

RgbImage decode_png(const std::string& path) {
  File file = open_file(path);
  std::string message = "corrupt or truncated";
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &message, on_png_error, on_png_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw UserError("out of memory decoding " + path);
  }
  RgbImage image;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw UserError("cannot decode PNG " + path + " (" + message + ")");
  }
  png_init_io(png, file.get());
  png_read_info(png, info);
  // To 8-bit RGB without gamma or background handling: PIL's convert("RGB") drops alpha and ignores gAMA.
  const int color = png_get_color_type(png, info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && png_get_bit_depth(png, info) < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  if (color & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
  png_set_strip_16(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  image.width = static_cast<int>(png_get_image_width(png, info));
  image.height = static_cast<int>(png_get_image_height(png, info));
  if (png_get_rowbytes(png, info) != static_cast<size_t>(image.width) * 3) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw UserError("PNG " + path + " has a pixel format mf-classify does not read");
  }
  image.pixels.resize(static_cast<size_t>(image.width) * image.height * 3);
  std::vector<png_bytep> rows(image.height);
  for (int y = 0; y < image.height; ++y) rows[y] = image.pixels.data() + static_cast<size_t>(y) * image.width * 3;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return image;
}

}  // namespace

RgbImage decode_image(const std::string& path) {
  File file = open_file(path);
  unsigned char signature[8] = {};
  const size_t read = std::fread(signature, 1, sizeof signature, file.get());
  if (read >= 3 && signature[0] == 0xFF && signature[1] == 0xD8 && signature[2] == 0xFF) return decode_jpeg(path);
  if (read == 8 && png_sig_cmp(signature, 0, 8) == 0) return decode_png(path);
  throw UserError("image " + path + " is neither JPEG nor PNG; pass a JPEG or PNG file");
}

}  // namespace mf
