// relabel.read_files: the files named by zero-padded path bytes, read whole (CPU).
//
// The batch source hands every batch's paths over as one [B, L] byte matrix, zero-padded. DALI's
// io.file.read needs each path cut to its length first (one more operator and one more input per
// batch) and then maps or streams the file; this operator takes the padded rows as they are, learns
// every size with one fstat, lets DALI allocate the whole batch at once, and reads each file into
// its place with plain read() calls, one sample per thread-pool task.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"

namespace dali_relabel {

using ::dali::CPUBackend;

namespace {

struct OpenFile {
  int fd = -1;
  int64_t size = 0;
  int error = 0;             // errno of the failed step, 0 if none
  const char *step = "";     // which step failed
  const char *kind = nullptr;  // what the path is, when it is not a regular file
};

std::string PathOf(const ::dali::TensorList<CPUBackend> &paths, int sample) {
  const char *bytes = static_cast<const char *>(paths.raw_tensor(sample));
  const int64_t capacity = ::dali::volume(paths.tensor_shape(sample));
  return std::string(bytes, strnlen(bytes, static_cast<size_t>(capacity)));
}

const char *KindOf(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

// Opens without blocking (a FIFO's open would wait for a writer forever), refuses anything but a
// regular file, then switches the descriptor back to blocking reads.
void Open(const std::string &path, OpenFile &file) {
  file.fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (file.fd < 0) {
    file.error = errno;
    file.step = "open";
    return;
  }
  struct stat info;
  if (fstat(file.fd, &info) != 0) {
    file.error = errno;
    file.step = "stat";
  } else if (!S_ISREG(info.st_mode)) {
    file.error = S_ISDIR(info.st_mode) ? EISDIR : EINVAL;
    file.step = "open";
    file.kind = KindOf(info.st_mode);
  } else {
    const int flags = fcntl(file.fd, F_GETFL);
    if (flags < 0 || fcntl(file.fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
      file.error = errno;
      file.step = "open";
    } else {
      file.size = info.st_size;
    }
  }
}

// Reads exactly `size` bytes (a file that shrank or grew since fstat is an error).
void ReadAll(OpenFile &file, uint8_t *out) {
  int64_t done = 0;
  while (done < file.size) {
    const ssize_t got = read(file.fd, out + done, static_cast<size_t>(file.size - done));
    if (got < 0) {
      if (errno == EINTR) continue;
      file.error = errno;
      file.step = "read";
      return;
    }
    if (got == 0) {
      file.error = EIO;
      file.step = "read (the file shrank while it was read)";
      return;
    }
    done += got;
  }
  uint8_t extra;
  if (read(file.fd, &extra, 1) > 0) {
    file.error = EIO;
    file.step = "read (the file grew while it was read)";
  }
}

void CloseAll(std::vector<OpenFile> &files) {
  for (auto &file : files) {
    if (file.fd >= 0) close(file.fd);
    file.fd = -1;
  }
}

}  // namespace

class ReadFilesOp : public ::dali::StatelessOperator<CPUBackend> {
 public:
  explicit ReadFilesOp(const ::dali::OpSpec &spec) : ::dali::StatelessOperator<CPUBackend>(spec) {}

 protected:
  // Returns false: the output sizes are known only once the files are open (RunImpl).
  bool SetupImpl(std::vector<::dali::OutputDesc> &, const ::dali::Workspace &ws) override {
    const auto &paths = ws.Input<CPUBackend>(0);
    DALI_ENFORCE(paths.type() == DALI_UINT8 && paths.sample_dim() == 1, ::dali::make_string(
        "relabel.read_files: paths must be uint8 vectors (zero-padded path bytes), got ", paths.type(),
        " with ", paths.sample_dim(), " dimensions"));
    return false;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &paths = ws.Input<CPUBackend>(0);
    auto &out = ws.Output<CPUBackend>(0);
    auto &pool = ws.GetThreadPool();
    const int n = paths.num_samples();
    files_.assign(n, OpenFile{});
    for (int i = 0; i < n; i++)
      pool.AddWork([&, i](int) { Open(PathOf(paths, i), files_[i]); });
    pool.RunAll();
    Check(paths);
    ::dali::TensorListShape<1> shape(n);
    for (int i = 0; i < n; i++) shape.set_tensor_shape(i, ::dali::TensorShape<1>(files_[i].size));
    out.Resize(shape, DALI_UINT8);
    for (int i = 0; i < n; i++)
      pool.AddWork([&, i](int) { ReadAll(files_[i], out.mutable_tensor<uint8_t>(i)); }, files_[i].size);
    pool.RunAll();
    Check(paths);
    CloseAll(files_);
  }

 private:
  // The first failed sample as an error naming its file (every descriptor closed first).
  void Check(const ::dali::TensorList<CPUBackend> &paths) {
    for (int i = 0; i < static_cast<int>(files_.size()); i++) {
      if (files_[i].error == 0) continue;
      const OpenFile failed = files_[i];
      CloseAll(files_);
      const std::string why = failed.kind && failed.error != EISDIR
          ? ::dali::make_string("not a regular file (", failed.kind, ")") : std::strerror(failed.error);
      DALI_FAIL(::dali::make_string("relabel.read_files: sample ", i, ": cannot ", failed.step, " '",
                                    PathOf(paths, i), "': ", why));
    }
  }

  std::vector<OpenFile> files_;
};

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__ReadFiles, ::dali_relabel::ReadFilesOp, ::dali::CPU);

DALI_SCHEMA(relabel__ReadFiles)
    .DocStr(R"(Reads whole files named by zero-padded path bytes.

Each sample of ``paths`` is a uint8 vector holding a path, followed by zero bytes up to the batch's
longest path (the rows of a ``[B, L]`` byte matrix as one external source output gives them).
Output: the file's bytes, uint8 ``[size]``. A file that cannot be opened or read, or is not a regular
file (a FIFO, device or socket is refused without opening it for blocking reads), stops the batch
with an error naming it.)")
    .NumInput(1)
    .NumOutput(1)
    .InputDox(0, "paths", "TensorList of uint8 vectors", "Path bytes, zero-padded.");
