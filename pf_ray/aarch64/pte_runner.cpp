// Run an ExecuTorch program (.pte, XNNPACK delegate) on a batch of images: what pf_ray.aarch64 runs under
// qemu-aarch64, cross-compiled for aarch64 against the libraries and headers of the executorch wheel.
//
//   pte_runner PROGRAM IMAGES LOGITS N C H W
//
// IMAGES: N*C*H*W float32 values (little-endian, C order); LOGITS: written as N*K float32 values. The program has a
// fixed batch B (1 for phones): images run B at a time, a last short chunk padded with zeros whose outputs are
// dropped, as pf_ray.export.executorch_pte.PteSession runs them on the host. Prints one JSON line: the machine, the
// program's batch and classes, and the CPU's features as the (emulated) kernel shows them. Exit code 1 with one
// line on stderr when anything fails.

#include <sys/utsname.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

using executorch::extension::Module;
using executorch::extension::make_tensor_ptr;
using executorch::runtime::Error;

static int fail(const std::string& message) {
  std::fprintf(stderr, "pte_runner: %s\n", message.c_str());
  return 1;
}

// The "Features" line of /proc/cpuinfo as a JSON list ("asimddp": dot product, "i8mm": int8 matrix multiply).
static std::string cpu_features() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, word, json = "[";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("Features", 0) == 0 && line.find(':') != std::string::npos) {
      std::istringstream words(line.substr(line.find(':') + 1));
      while (words >> word) {
        json += (json.size() > 1 ? ", \"" : "\"") + word + "\"";
      }
      break;
    }
  }
  return json + "]";
}

int main(int argc, char** argv) {
  if (argc != 8) {
    return fail("usage: pte_runner PROGRAM IMAGES LOGITS N C H W");
  }
  const long count = std::atol(argv[4]);
  const int channels = std::atoi(argv[5]), height = std::atoi(argv[6]), width = std::atoi(argv[7]);
  if (count < 1 || channels < 1 || height < 1 || width < 1) {
    return fail("N, C, H and W must be positive");
  }
  const size_t image_size = static_cast<size_t>(channels) * height * width;

  std::vector<float> images(count * image_size);
  FILE* in = std::fopen(argv[2], "rb");
  if (in == nullptr || std::fread(images.data(), sizeof(float), images.size(), in) != images.size()) {
    return fail(std::string("cannot read ") + std::to_string(images.size()) + " floats from " + argv[2]);
  }
  std::fclose(in);

  Module module(argv[1], Module::LoadMode::File);
  if (module.load_forward() != Error::Ok) {
    return fail(std::string("ExecuTorch cannot load the forward method of ") + argv[1]);
  }
  auto meta = module.method_meta("forward");
  if (!meta.ok() || meta->num_inputs() != 1 || meta->num_outputs() < 1) {
    return fail("the program's forward method does not take one input tensor");
  }
  auto input_meta = meta->input_tensor_meta(0);
  if (!input_meta.ok() || input_meta->sizes().size() != 4) {
    return fail("the program's input is not a 4-d (N, C, H, W) tensor");
  }
  auto sizes = input_meta->sizes();
  const int batch = sizes[0];
  if (sizes[1] != channels || sizes[2] != height || sizes[3] != width) {
    return fail("the program's input is " + std::to_string(sizes[1]) + "x" + std::to_string(sizes[2]) + "x" +
                std::to_string(sizes[3]) + ", the images " + std::to_string(channels) + "x" +
                std::to_string(height) + "x" + std::to_string(width));
  }

  std::vector<float> chunk(batch * image_size);
  std::vector<float> logits;
  long classes = -1;
  for (long start = 0; start < count; start += batch) {
    const long used = std::min<long>(batch, count - start);
    std::fill(chunk.begin(), chunk.end(), 0.0f);
    std::memcpy(chunk.data(), images.data() + start * image_size, used * image_size * sizeof(float));
    auto input = make_tensor_ptr({batch, channels, height, width}, chunk.data());
    auto outputs = module.forward(input);
    if (!outputs.ok() || outputs->empty() || !(*outputs)[0].isTensor()) {
      return fail("forward failed on images " + std::to_string(start) + ".." + std::to_string(start + used - 1) +
                  " (error " + std::to_string(outputs.ok() ? 0 : static_cast<int>(outputs.error())) + ")");
    }
    const auto& tensor = (*outputs)[0].toTensor();
    if (tensor.dim() != 2 || tensor.size(0) != batch) {
      return fail("the program's first output is not a (batch, classes) tensor");
    }
    classes = tensor.size(1);
    const float* data = tensor.const_data_ptr<float>();
    logits.insert(logits.end(), data, data + used * classes);
  }

  FILE* out = std::fopen(argv[3], "wb");
  if (out == nullptr || std::fwrite(logits.data(), sizeof(float), logits.size(), out) != logits.size() ||
      std::fclose(out) != 0) {
    return fail(std::string("cannot write ") + argv[3]);
  }
  struct utsname host;
  const std::string machine = uname(&host) == 0 ? host.machine : "unknown";
  std::printf("{\"machine\": \"%s\", \"runtime\": \"executorch\", \"batch\": %d, \"classes\": %ld, "
              "\"cpu_features\": %s}\n", machine.c_str(), batch, classes, cpu_features().c_str());
  return 0;
}
