#include "shardprop/checkpoint.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "shardprop/error.hpp"
#include "test_util.hpp"
#include "shardprop/h5.hpp"

namespace shardprop {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("shardprop_ckpt_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  ModelSpec spec_ = parse_model("5,7:tanh,3:softmax", "xent");
  fs::path dir_;
};

TEST_F(CheckpointTest, RoundTripIsBitwise) {
  const Layout layout(spec_);
  AlignedVector<float> params(layout.size(), 0.0f);
  init_params<float>(spec_, layout, 4, std::span<float>(params));
  layout.bias(std::span<float>(params), 1) << 0.25f, -1e-30f, 3.0f;
  save_model(path("m.h5"), spec_, params, 17, 2);
  EXPECT_FALSE(fs::exists(path("m.h5.tmp")));
  EXPECT_TRUE(is_model_file(path("m.h5")));
  const ModelFile m = load_model(path("m.h5"));
  EXPECT_EQ(m.spec.layers_string(), spec_.layers_string());
  EXPECT_EQ(m.spec.loss, Loss::xent);
  EXPECT_EQ(m.step, 17u);
  EXPECT_EQ(m.epoch, 2u);
  ASSERT_EQ(m.params.size(), params.size());
  EXPECT_EQ(std::memcmp(m.params.data(), params.data(), params.size() * sizeof(float)), 0);
}

TEST_F(CheckpointTest, RejectsOtherFilesWithTheirOwnErrors) {
  const Layout layout(spec_);
  AlignedVector<float> params(layout.size(), 1.0f);
  save_model(path("m.h5"), spec_, params, 1, 0);

  expect_error([&] { load_model(path("none.h5")); }, "none.h5: no such file");
  std::ofstream(path("junk.h5")) << "junk";
  expect_error([&] { load_model(path("junk.h5")); }, "junk.h5: not an HDF5 file");
  {
    h5::Handle f = h5::create_file(path("data.h5"));
    f.close("closing");
  }
  EXPECT_FALSE(is_model_file(path("data.h5")));
  expect_error([&] { load_model(path("data.h5")); }, "missing attribute 'format'");

  // A newer format version.
  fs::copy_file(path("m.h5"), path("v2.h5"));
  {
    h5::Handle f(H5Fopen(path("v2.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "open");
    h5::Handle a(H5Aopen(f.get(), "format_version", H5P_DEFAULT), H5Aclose, "open attr");
    const std::int64_t v = 99;
    h5::check(H5Awrite(a.get(), H5T_NATIVE_INT64, &v), "write");
  }
  expect_error([&] { load_model(path("v2.h5")); }, "format_version 99 is not supported");

  // A weight of the wrong shape for the stated layers.
  {
    h5::Handle f = h5::create_file(path("shape.h5"));
    h5::Handle space(H5Screate(H5S_SCALAR), H5Sclose, "space");
    for (const char* name : {"format", "layers", "loss"}) {
      const std::string value = name[0] == 'f' ? kCheckpointFormat : name[1] == 'a' ? "5,7:tanh,3:softmax" : "xent";
      h5::Handle type(H5Tcopy(H5T_C_S1), H5Tclose, "type");
      h5::check(H5Tset_size(type.get(), value.size() + 1), "size");
      h5::Handle a(H5Acreate2(f.get(), name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                   H5Aclose, "attr");
      h5::check(H5Awrite(a.get(), type.get(), value.c_str()), "write");
    }
    for (const char* name : {"format_version", "step", "epoch"}) {
      const std::int64_t v = name[0] == 'f' ? kCheckpointVersion : 0;
      h5::Handle a(H5Acreate2(f.get(), name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                   H5Aclose, "attr");
      h5::check(H5Awrite(a.get(), H5T_NATIVE_INT64, &v), "write");
    }
    h5::Handle g(H5Gcreate2(f.get(), "params", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "g");
    h5::Handle l(H5Gcreate2(g.get(), "layer_0", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "l");
    std::vector<float> w(6 * 7, 0.0f);
    h5::write_dataset(l.get(), "W", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {6, 7}, w.data());
  }
  expect_error([&] { load_model(path("shape.h5")); },
               "/params/layer_0/W has the wrong type or shape for --layers 5,7:tanh,3:softmax");
}

TEST_F(CheckpointTest, FailedWriteLeavesTheExistingFileIntact) {
  const Layout layout(spec_);
  AlignedVector<float> params(layout.size(), 2.0f);
  save_model(path("m.h5"), spec_, params, 5, 1);
  // Parameters of another size cannot be saved; the old file stays as it was.
  AlignedVector<float> wrong(3, 0.0f);
  EXPECT_THROW(save_model(path("m.h5"), spec_, wrong, 6, 1), Error);
  EXPECT_EQ(load_model(path("m.h5")).step, 5u);
  // An unwritable place fails with an error naming it.
  expect_error([&] { save_model(path("no/such/dir/m.h5"), spec_, params, 1, 0); }, "no/such/dir");
}

}  // namespace
}  // namespace shardprop
