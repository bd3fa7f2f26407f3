// gauss-runner: rank candidates with an exported ranker package (.pt2) without Python.
//
// The package is the AOTInductor program written by gauss_plugins.export.aoti.export_aoti:
//   forward(history f32[B, N, D], history_len i64[B], candidates f32[B, M, D]) -> f32[B, M]
// Item embedding rows are gathered here, outside the compiled graph, from a frozen snapshot
// (.gsnp, layout in gauss_plugins/export/snapshot.py) or from Redis (the keys RedisWePS
// writes, see gauss_integrations/redis/store.py), so the served rows can change without
// re-exporting.
//
// Requests, one per line:  <history ids> | <candidate ids>   (ids space-separated, int64)
// Output, one line per request: the candidates' scores, space-separated, "%.9g".
// Blank lines and lines starting with '#' are skipped. The batching rules below are the
// Python Predictor's (gauss_plugins.export.predictor, `gauss rank`), so both give the same scores:
//   * consecutive requests are scored in groups of --batch-size;
//   * N = max(1, longest history in the group), histories padded with zero rows, history_len
//     = the true length; M = most candidates in the group, missing slots zero rows (their
//     scores are dropped);
//   * a history longer than the package's max_seq_len keeps its most recent max_seq_len ids.
//
// Exit status: 0 ok, 1 a request or the embedding source failed (the message names the line
// or the id), 2 bad command line or package.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#ifdef GAUSS_WITH_REDIS
#include <hiredis/hiredis.h>
#endif

namespace {

static_assert(sizeof(float) == 4, "float must be IEEE-754 binary32");

// An error in the input or the embedding source (exit 1) vs. in the setup (exit 2).
struct RequestError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct SetupError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

bool host_is_little_endian() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// ------------------------------------------------------------------ CRC-32 (zlib polynomial)
uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the host is little-endian (checked in main)
  return v;
}

// ------------------------------------------------------------------ embedding sources
class RowSource {
 public:
  virtual ~RowSource() = default;
  virtual int64_t dim() const = 0;
  virtual std::string describe() const = 0;
  // Rows of `ids` (unique) into out[ids.size() * dim]; an id the source lacks is a
  // RequestError naming it: serving zeros for an unknown item would rank it silently wrongly.
  virtual void fetch(const std::vector<int64_t>& ids, float* out) = 0;
};

class SnapshotSource : public RowSource {
 public:
  explicit SnapshotSource(const std::string& path) : path_(path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw SetupError("snapshot " + path + " cannot be opened (" + std::strerror(errno) +
                             "): pass --snapshot with an existing .gsnp file");
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t header = 24, crc_size = 4;
    if (data.size() < header + crc_size)
      throw SetupError(path + ": " + std::to_string(data.size()) + " bytes is too short for a snapshot");
    if (std::memcmp(data.data(), "GSNP0001", 8) != 0)
      throw SetupError(path + ": not a gauss snapshot (bad magic)");
    const uint64_t n = read_le<uint64_t>(data.data() + 8);
    const uint32_t dim = read_le<uint32_t>(data.data() + 16);
    const uint32_t code = read_le<uint32_t>(data.data() + 20);
    if (code != 0) throw SetupError(path + ": unknown dtype code " + std::to_string(code) + " (only 0 = float32)");
    if (dim < 1) throw SetupError(path + ": dim is 0");
    // n is bounded by the file size before multiplying, so a corrupted n cannot overflow
    // into a length that happens to match.
    const uint64_t body = data.size() - header - crc_size;
    const uint64_t per_row = 8 + 4 * uint64_t(dim);
    if (n > body / per_row || n * per_row != body)
      throw SetupError(path + ": " + std::to_string(data.size()) + " bytes do not match the header (" +
                       std::to_string(n) + " rows of dim " + std::to_string(dim) +
                       "): the file is truncated or was not written by write_snapshot");
    const uint32_t stored = read_le<uint32_t>(data.data() + data.size() - crc_size);
    const uint32_t actual = crc32_update(0, data.data(), data.size() - crc_size);
    if (stored != actual) {
      char msg[160];
      std::snprintf(msg, sizeof(msg), ": CRC-32 mismatch (stored %08x, computed %08x): the file is corrupted; ",
                    stored, actual);
      throw SetupError(path + msg + "export the snapshot again");
    }
    dim_ = dim;
    ids_.resize(n);
    rows_.resize(n * dim);
    std::memcpy(ids_.data(), data.data() + header, 8 * n);
    std::memcpy(rows_.data(), data.data() + header + 8 * n, 4 * n * dim);
    for (uint64_t i = 1; i < n; ++i)
      if (ids_[i] <= ids_[i - 1]) throw SetupError(path + ": ids are not sorted ascending and unique");
  }
  int64_t dim() const override { return dim_; }
  std::string describe() const override { return "snapshot " + path_; }
  void fetch(const std::vector<int64_t>& ids, float* out) override {
    for (size_t i = 0; i < ids.size(); ++i) {
      auto it = std::lower_bound(ids_.begin(), ids_.end(), ids[i]);
      if (it == ids_.end() || *it != ids[i])
        throw RequestError("item id " + std::to_string(ids[i]) + " is not in " + describe() +
                           ": re-export the snapshot from a model that has seen it, or drop it from the request");
      std::memcpy(out + i * dim_, rows_.data() + (it - ids_.begin()) * dim_, sizeof(float) * dim_);
    }
  }

 private:
  std::string path_;
  int64_t dim_ = 0;
  std::vector<int64_t> ids_;
  std::vector<float> rows_;
};

#ifdef GAUSS_WITH_REDIS
// Rows as RedisWePS writes them: key "<prefix>:<16 hex digits of the id's two's complement>",
// value dim + state_dim little-endian float32 (the row, then optimizer state we ignore).
class RedisSource : public RowSource {
 public:
  RedisSource(const std::string& host, int port, std::string prefix, int64_t dim, int64_t state_dim)
      : host_(host), port_(port), prefix_(std::move(prefix)), dim_(dim), state_dim_(state_dim) {
    timeval timeout{5, 0};
    ctx_ = redisConnectWithTimeout(host.c_str(), port, timeout);
    if (ctx_ == nullptr || ctx_->err) {
      std::string why = ctx_ ? ctx_->errstr : "out of memory";
      if (ctx_) redisFree(ctx_);
      ctx_ = nullptr;
      throw SetupError("cannot connect to Redis at " + host + ":" + std::to_string(port) + " (" + why +
                       "): start the server or pass the right --redis URL");
    }
    redisSetTimeout(ctx_, timeout);
    // Credentials come from the environment, never from the URL: the URL may sit in the
    // package metadata and in process listings.
    const char* password = std::getenv("GAUSS_REDIS_PASSWORD");
    const char* user = std::getenv("GAUSS_REDIS_USERNAME");
    if (password != nullptr && *password != '\0') {
      std::vector<const char*> argv = {"AUTH"};
      if (user != nullptr && *user != '\0') argv.push_back(user);
      argv.push_back(password);
      std::vector<size_t> argl;
      for (const char* a : argv) argl.push_back(std::strlen(a));
      expect_ok(redisCommandArgv(ctx_, int(argv.size()), argv.data(), argl.data()), "AUTH",
                "check GAUSS_REDIS_PASSWORD (and GAUSS_REDIS_USERNAME for an ACL user)");
    }
    // One round trip now, so a server that wants a password fails here with a hint, not at
    // the first request.
    expect_ok(redisCommand(ctx_, "PING"), "PING",
              "set GAUSS_REDIS_PASSWORD (and GAUSS_REDIS_USERNAME for an ACL user) when the server requires AUTH");
  }
  ~RedisSource() override {
    if (ctx_) redisFree(ctx_);
  }
  int64_t dim() const override { return dim_; }
  std::string describe() const override {
    return "Redis " + host_ + ":" + std::to_string(port_) + " under " + prefix_ + ":";
  }
  void fetch(const std::vector<int64_t>& ids, float* out) override {
    const size_t chunk = 10000;  // RedisWePS reads in MGETs of this size too
    const size_t row_bytes = 4 * size_t(dim_ + state_dim_);
    for (size_t start = 0; start < ids.size(); start += chunk) {
      const size_t n = std::min(chunk, ids.size() - start);
      std::vector<std::string> keys(n);
      std::vector<const char*> argv(n + 1);
      std::vector<size_t> argl(n + 1);
      argv[0] = "MGET";
      argl[0] = 4;
      for (size_t i = 0; i < n; ++i) {
        char hex[17];
        std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(ids[start + i]));
        keys[i] = prefix_ + ":" + hex;
        argv[i + 1] = keys[i].c_str();
        argl[i + 1] = keys[i].size();
      }
      auto* reply = static_cast<redisReply*>(redisCommandArgv(ctx_, int(n + 1), argv.data(), argl.data()));
      if (reply == nullptr)
        throw RequestError("Redis MGET failed on " + describe() + " (" + (ctx_->err ? ctx_->errstr : "no reply") + ")");
      std::unique_ptr<redisReply, void (*)(void*)> guard(reply, freeReplyObject);
      if (reply->type == REDIS_REPLY_ERROR)
        throw RequestError("Redis MGET failed on " + describe() + ": " + std::string(reply->str, reply->len));
      if (reply->type != REDIS_REPLY_ARRAY || reply->elements != n)
        throw RequestError("Redis MGET on " + describe() + " returned an unexpected reply");
      for (size_t i = 0; i < n; ++i) {
        const redisReply* r = reply->element[i];
        const int64_t id = ids[start + i];
        if (r->type == REDIS_REPLY_NIL)
          throw RequestError("item id " + std::to_string(id) + " is not in " + describe() +
                             " (no key " + keys[i] + "): sync the store, or drop it from the request");
        if (r->type != REDIS_REPLY_STRING || r->len != row_bytes)
          throw RequestError("Redis key " + keys[i] + " holds " + std::to_string(r->len) + " bytes, expected " +
                             std::to_string(row_bytes) + " (dim " + std::to_string(dim_) + " + state_dim " +
                             std::to_string(state_dim_) + "): pass the store's --state-dim, or another writer "
                             "uses this prefix");
        std::memcpy(out + (start + i) * dim_, r->str, sizeof(float) * dim_);
      }
    }
  }

 private:
  void expect_ok(void* raw, const char* what, const std::string& hint) {
    auto* reply = static_cast<redisReply*>(raw);
    if (reply == nullptr)
      throw SetupError(std::string("Redis ") + what + " failed on " + describe() + " (" +
                       (ctx_->err ? ctx_->errstr : "no reply") + ")");
    std::unique_ptr<redisReply, void (*)(void*)> guard(reply, freeReplyObject);
    if (reply->type == REDIS_REPLY_ERROR)
      throw SetupError(std::string("Redis ") + what + " failed on " + describe() + ": " +
                       std::string(reply->str, reply->len) + ": " + hint);
  }

  std::string host_;
  int port_;
  std::string prefix_;
  int64_t dim_, state_dim_;
  redisContext* ctx_ = nullptr;
};
#endif

// "redis://host:port/<prefix>" -> host, port, prefix (prefix = RedisWePS.key_prefix minus ':').
void parse_redis_url(const std::string& url, std::string& host, int& port, std::string& prefix) {
  const std::string scheme = "redis://";
  if (url.compare(0, scheme.size(), scheme) != 0)
    throw SetupError("Redis source " + url + " must look like redis://host:port/<prefix>");
  const std::string rest = url.substr(scheme.size());
  const size_t slash = rest.find('/');
  if (slash == std::string::npos || slash + 1 >= rest.size())
    throw SetupError("Redis source " + url + " has no key prefix: use redis://host:port/<prefix> where <prefix> is "
                     "the store's {prefix}:{model}:{table}");
  const std::string hostport = rest.substr(0, slash);
  prefix = rest.substr(slash + 1);
  while (!prefix.empty() && prefix.back() == ':') prefix.pop_back();
  const size_t colon = hostport.rfind(':');
  host = colon == std::string::npos ? hostport : hostport.substr(0, colon);
  port = 6379;
  if (colon != std::string::npos) {
    char* end = nullptr;
    const long p = std::strtol(hostport.c_str() + colon + 1, &end, 10);
    if (*end != '\0' || p < 1 || p > 65535) throw SetupError("Redis source " + url + ": bad port");
    port = int(p);
  }
  if (host.empty()) throw SetupError("Redis source " + url + " has no host");
}

// ------------------------------------------------------------------ requests
struct Request {
  size_t line;
  std::vector<int64_t> history, candidates;
};

std::vector<int64_t> parse_ids(const std::string& text, size_t line, const char* what) {
  std::vector<int64_t> ids;
  std::istringstream in(text);
  std::string tok;
  while (in >> tok) {
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(tok.c_str(), &end, 10);
    if (end == tok.c_str() || *end != '\0' || errno == ERANGE)
      throw RequestError("line " + std::to_string(line) + ": " + what + " id '" + tok +
                         "' is not a 64-bit integer");
    ids.push_back(v);
  }
  return ids;
}

// false for a blank line (skipped).
bool parse_request(const std::string& raw, size_t line, Request& req) {
  std::string text = raw;
  if (!text.empty() && text.back() == '\r') text.pop_back();
  const size_t first = text.find_first_not_of(" \t");
  if (first == std::string::npos || text[first] == '#') return false;  // blank or comment
  const size_t bar = text.find('|');
  if (bar == std::string::npos || text.find('|', bar + 1) != std::string::npos)
    throw RequestError("line " + std::to_string(line) +
                       ": expected '<history ids> | <candidate ids>' with exactly one '|'");
  req.line = line;
  req.history = parse_ids(text.substr(0, bar), line, "history");
  req.candidates = parse_ids(text.substr(bar + 1), line, "candidate");
  if (req.candidates.empty())
    throw RequestError("line " + std::to_string(line) + ": no candidate ids after '|' (at least one is needed)");
  return true;
}

// ------------------------------------------------------------------ the ranker
class Ranker {
 public:
  explicit Ranker(const std::string& package)
      : loader_(load(package)), metadata_(loader_->get_metadata()) {
    auto need = [&](const std::string& key) {
      auto it = metadata_.find(key);
      if (it == metadata_.end())
        throw SetupError(package + ": metadata lacks '" + key + "': it was not written by gauss export; export it again");
      return it->second;
    };
    if (need("gauss_format") != "1")
      throw SetupError(package + ": gauss_format " + need("gauss_format") + " is not 1: this runner is too old or "
                       "the package is not a gauss ranker");
    if (need("dtype") != "float32") throw SetupError(package + ": dtype " + need("dtype") + " is not float32");
    const std::string names = need("input_names");
    if (names != "history,history_len,candidates")
      throw SetupError(package + ": inputs are " + names + "; the runner serves the three-input ranker only "
                       "(models with a time bias take event times: serve them with the Python Predictor)");
    dim_ = std::stoll(need("dim"));
    max_history_ = std::stoll(need("max_seq_len"));
    if (dim_ < 1 || max_history_ < 1) throw SetupError(package + ": bad dim or max_seq_len in the metadata");
  }

  int64_t dim() const { return dim_; }
  int64_t max_history() const { return max_history_; }
  const std::unordered_map<std::string, std::string>& metadata() const { return metadata_; }

  // Scores of every request of the group, in order.
  std::vector<std::vector<float>> score(const std::vector<Request>& group, RowSource& rows) {
    const int64_t b = int64_t(group.size());
    int64_t n = 1, m = 1;
    for (const auto& r : group) {
      n = std::max<int64_t>(n, std::min<int64_t>(int64_t(r.history.size()), max_history_));
      m = std::max<int64_t>(m, int64_t(r.candidates.size()));
    }
    // One fetch of the group's distinct ids.
    std::vector<int64_t> uniq;
    for (const auto& r : group) {
      const size_t skip = r.history.size() > size_t(max_history_) ? r.history.size() - max_history_ : 0;
      uniq.insert(uniq.end(), r.history.begin() + skip, r.history.end());
      uniq.insert(uniq.end(), r.candidates.begin(), r.candidates.end());
    }
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    std::vector<float> fetched(uniq.size() * dim_);
    rows.fetch(uniq, fetched.data());
    auto row_of = [&](int64_t id) {
      return fetched.data() + (std::lower_bound(uniq.begin(), uniq.end(), id) - uniq.begin()) * dim_;
    };

    auto history = at::zeros({b, n, dim_}, at::kFloat);
    auto history_len = at::zeros({b}, at::kLong);
    auto candidates = at::zeros({b, m, dim_}, at::kFloat);
    float* h = history.data_ptr<float>();
    float* c = candidates.data_ptr<float>();
    int64_t* lens = history_len.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; ++i) {
      const auto& r = group[i];
      const size_t skip = r.history.size() > size_t(max_history_) ? r.history.size() - max_history_ : 0;
      const int64_t len = int64_t(r.history.size() - skip);
      lens[i] = len;
      for (int64_t j = 0; j < len; ++j)
        std::memcpy(h + (i * n + j) * dim_, row_of(r.history[skip + j]), sizeof(float) * dim_);
      for (size_t j = 0; j < r.candidates.size(); ++j)
        std::memcpy(c + (i * m + int64_t(j)) * dim_, row_of(r.candidates[j]), sizeof(float) * dim_);
    }
    auto outputs = loader_->run({history, history_len, candidates});
    if (outputs.size() != 1 || outputs[0].dim() != 2 || outputs[0].size(0) != b || outputs[0].size(1) != m)
      throw SetupError("the package returned an unexpected output (expected one [B, M] tensor)");
    auto scores = outputs[0].to(at::kFloat).contiguous();
    const float* s = scores.data_ptr<float>();
    std::vector<std::vector<float>> result(b);
    for (int64_t i = 0; i < b; ++i)
      result[i].assign(s + i * m, s + i * m + int64_t(group[i].candidates.size()));
    return result;
  }

 private:
  static std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load(const std::string& package) {
    std::ifstream probe(package, std::ios::binary);
    if (!probe) throw SetupError("package " + package + " cannot be opened: create one with `gauss export`");
    char magic[4] = {0, 0, 0, 0};
    probe.read(magic, 4);
    if (std::memcmp(magic, "PK\x03\x04", 4) != 0)
      throw SetupError(package + " is not a .pt2 package (not a zip archive): it is corrupted; export it again");
    try {
      return std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
    } catch (const std::exception& e) {
      std::string what = e.what();
      what = what.substr(0, what.find('\n'));
      throw SetupError(package + " could not be loaded as an AOTInductor package (" + what +
                       "): it is corrupted or was compiled by another torch version; export it again");
    }
  }

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::unordered_map<std::string, std::string> metadata_;
  int64_t dim_ = 0, max_history_ = 0;
};

// ------------------------------------------------------------------ command line
#ifdef GAUSS_WITH_REDIS
constexpr bool kHasRedis = true;
#else
constexpr bool kHasRedis = false;
#endif

const char* kUsage =
    "usage: gauss-runner --package MODEL.pt2 [--snapshot ROWS.gsnp | --redis redis://HOST:PORT/PREFIX]\n"
    "                    [--state-dim K] [--input FILE] [--batch-size N] [--threads T] [--timing] [--print-metadata] [--version]\n"
    "\n"
    "Ranks candidates with an exported gauss ranker, without Python. Requests, one per line on\n"
    "stdin (or --input): '<history item ids> | <candidate item ids>'. Prints one line per request:\n"
    "the candidates' scores, space-separated. Without --snapshot/--redis the package's\n"
    "embedding_source metadata is used (a relative snapshot path is taken relative to the package).\n"
    "  --state-dim K     Redis rows carry K optimizer-state floats after the row (default 0)\n"
    "                    (a password-protected Redis: GAUSS_REDIS_PASSWORD [, GAUSS_REDIS_USERNAME])\n"
    "  --batch-size N    requests scored per forward (default 256, as `gauss rank`)\n"
    "  --threads T       intra-op threads (default: torch's choice)\n"
    "  --timing          print load and serving seconds to stderr at the end\n"
    "  --print-metadata  print the package metadata as key=value lines and exit\n"
    "  --version         print the runner's format version and whether Redis support is built in\n";

struct Options {
  std::string package, snapshot, redis, input;
  int64_t state_dim = 0, batch_size = 256, threads = 0;
  bool print_metadata = false, timing = false;
};

int64_t parse_positive(const std::string& flag, const std::string& value, bool allow_zero) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE || v < (allow_zero ? 0 : 1))
    throw SetupError(flag + " needs " + (allow_zero ? "a non-negative" : "a positive") + " integer, got '" + value + "'");
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw SetupError(a + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (a == "--package") o.package = value();
    else if (a == "--snapshot") o.snapshot = value();
    else if (a == "--redis") o.redis = value();
    else if (a == "--input") o.input = value();
    else if (a == "--state-dim") o.state_dim = parse_positive(a, value(), true);
    else if (a == "--batch-size") o.batch_size = parse_positive(a, value(), false);
    else if (a == "--threads") o.threads = parse_positive(a, value(), false);
    else if (a == "--print-metadata") o.print_metadata = true;
    else if (a == "--timing") o.timing = true;
    else if (a == "--version") {
      // What a build can serve: build_runner() and the tests ask before using Redis.
      std::cout << "gauss-runner 1 redis=" << (kHasRedis ? "yes" : "no") << "\n";
      std::exit(0);
    }
    else if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else
      throw SetupError("unknown argument '" + a + "'\n" + kUsage);
  }
  if (o.package.empty()) throw SetupError(std::string("--package is required\n") + kUsage);
  if (!o.snapshot.empty() && !o.redis.empty()) throw SetupError("pass --snapshot or --redis, not both");
  return o;
}

std::string dirname_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
}

std::unique_ptr<RowSource> open_source(const Options& o, const Ranker& ranker) {
  std::string snapshot = o.snapshot, redis = o.redis;
  if (snapshot.empty() && redis.empty()) {
    auto it = ranker.metadata().find("embedding_source");
    const std::string src = it == ranker.metadata().end() ? "" : it->second;
    if (src.rfind("snapshot:", 0) == 0) {
      snapshot = src.substr(9);
      if (!snapshot.empty() && snapshot[0] != '/') snapshot = dirname_of(o.package) + "/" + snapshot;
    } else if (src.rfind("redis://", 0) == 0) {
      redis = src;
    } else {
      throw SetupError(o.package + " names no embedding source (embedding_source='" + src +
                       "'): pass --snapshot ROWS.gsnp or --redis redis://HOST:PORT/PREFIX");
    }
  }
  std::unique_ptr<RowSource> source;
  if (!snapshot.empty()) {
    source = std::make_unique<SnapshotSource>(snapshot);
  } else {
    std::string host, prefix;
    int port = 0;
    parse_redis_url(redis, host, port, prefix);
#ifdef GAUSS_WITH_REDIS
    source = std::make_unique<RedisSource>(host, port, prefix, ranker.dim(), o.state_dim);
#else
    throw SetupError("this gauss-runner was built without Redis support (hiredis was not found): install "
                     "libhiredis-dev and rebuild with `gauss build-runner --force`, or serve from a --snapshot");
#endif
  }
  if (source->dim() != ranker.dim())
    throw SetupError(source->describe() + " has rows of dim " + std::to_string(source->dim()) +
                     " but the package expects dim " + std::to_string(ranker.dim()));
  return source;
}

void print_scores(const std::vector<float>& scores) {
  std::string line;
  char buf[32];
  for (size_t j = 0; j < scores.size(); ++j) {
    std::snprintf(buf, sizeof(buf), j ? " %.9g" : "%.9g", double(scores[j]));
    line += buf;
  }
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
}

int run(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  if (o.threads > 0) at::set_num_threads(int(o.threads));
  using clock = std::chrono::steady_clock;
  const auto started = clock::now();
  Ranker ranker(o.package);
  if (o.print_metadata) {
    std::map<std::string, std::string> sorted(ranker.metadata().begin(), ranker.metadata().end());
    for (const auto& kv : sorted) std::cout << kv.first << "=" << kv.second << "\n";
    return 0;
  }
  auto source = open_source(o, ranker);
  const auto loaded = clock::now();
  size_t served = 0;

  std::ifstream file;
  if (!o.input.empty()) {
    file.open(o.input);
    if (!file) throw SetupError("request file " + o.input + " cannot be opened (" + std::strerror(errno) + ")");
  }
  std::istream& in = o.input.empty() ? std::cin : file;
  std::vector<Request> group;
  std::string text;
  size_t line = 0;
  auto flush = [&]() {
    if (group.empty()) return;
    for (const auto& scores : ranker.score(group, *source)) print_scores(scores);
    std::fflush(stdout);
    served += group.size();
    group.clear();
  };
  while (std::getline(in, text)) {
    ++line;
    Request req;
    if (!parse_request(text, line, req)) continue;
    group.push_back(std::move(req));
    if (int64_t(group.size()) == o.batch_size) flush();
  }
  flush();
  if (o.timing) {
    // Serving time apart from the one-off load (unzip + dlopen of the package), so callers
    // can compare steady-state throughput with an in-process Python predictor.
    const std::chrono::duration<double> load = loaded - started, serve = clock::now() - loaded;
    std::fprintf(stderr, "gauss-runner timing: load_s=%.6f requests=%zu serve_s=%.6f\n", load.count(), served,
                 serve.count());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (!host_is_little_endian()) {
    std::fprintf(stderr, "gauss-runner: error: snapshots and Redis rows are little-endian; this host is not\n");
    return 2;
  }
  try {
    return run(argc, argv);
  } catch (const RequestError& e) {
    std::fprintf(stderr, "gauss-runner: error: %s\n", e.what());
    return 1;
  } catch (const SetupError& e) {
    std::fprintf(stderr, "gauss-runner: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gauss-runner: error: %s\n", e.what());
    return 1;
  }
}
