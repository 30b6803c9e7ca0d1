// ferrocomm.hpp: a header-only C++20 wrapper over the C API of ferrocomm.h.
//
// - RAII: Communicator and Request own their handles (move-only) and release them in their
//   destructors: a Request that is destroyed before it was waited for withdraws its receive
//   or waits for its transfer, so a buffer is never used after its Request is gone.
// - Errors are exceptions: ferrocomm::Error carries the ferrocomm_result code and the full
//   message of ferrocomm_last_error().
// - Buffers are contiguous ranges (std::vector, std::array, std::span, C arrays) of the
//   element types of ferrocomm_dtype; ferrocomm::f16 and ferrocomm::bf16 hold 16-bit floats.
//
// Thread safety and blocking behaviour are those of the C functions each method calls
// (documented in ferrocomm.h): a Communicator serves one thread at a time.
//
//   #include <ferrocomm.hpp>
//   auto comm = ferrocomm::Communicator::init();
//   std::vector<float> v(4, float(comm.rank()));
//   comm.send(v, (comm.rank() + 1) % comm.size(), /*tag=*/0);
//
// Link with -lferrocomm, compile with -std=c++20.
#ifndef FERROCOMM_HPP
#define FERROCOMM_HPP

#include <ferrocomm.h>

#include <cstdint>
#include <optional>
#include <ranges>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace ferrocomm {

/// A failed ferrocomm call: the result code and the library's full message.
class Error : public std::runtime_error {
  public:
    Error(ferrocomm_result code, const std::string &message)
        : std::runtime_error(message), code_(code) {}
    /// The ferrocomm_result code (FERROCOMM_ERR_...).
    ferrocomm_result code() const noexcept { return code_; }

  private:
    ferrocomm_result code_;
};

/// Throws Error unless `r` is FERROCOMM_OK.
inline void check(ferrocomm_result r) {
    if (r != FERROCOMM_OK) {
        throw Error(r, std::string(ferrocomm_strerror(r)) + ": " + ferrocomm_last_error());
    }
}

/// IEEE 754 binary16, as its bit pattern.
struct f16 {
    std::uint16_t bits;
};
/// bfloat16, as its bit pattern (the upper half of a binary32).
struct bf16 {
    std::uint16_t bits;
};

/// The ferrocomm_dtype of an element type (no definition: not an element type).
template <class T> struct dtype_of;
#define FERROCOMM_HPP_DTYPE(T, D)                                                            \
    template <> struct dtype_of<T> {                                                         \
        static constexpr ferrocomm_dtype value = D;                                          \
    }
FERROCOMM_HPP_DTYPE(std::uint8_t, FERROCOMM_U8);
FERROCOMM_HPP_DTYPE(std::int8_t, FERROCOMM_I8);
FERROCOMM_HPP_DTYPE(std::uint16_t, FERROCOMM_U16);
FERROCOMM_HPP_DTYPE(std::int16_t, FERROCOMM_I16);
FERROCOMM_HPP_DTYPE(std::uint32_t, FERROCOMM_U32);
FERROCOMM_HPP_DTYPE(std::int32_t, FERROCOMM_I32);
FERROCOMM_HPP_DTYPE(std::uint64_t, FERROCOMM_U64);
FERROCOMM_HPP_DTYPE(std::int64_t, FERROCOMM_I64);
FERROCOMM_HPP_DTYPE(f16, FERROCOMM_F16);
FERROCOMM_HPP_DTYPE(bf16, FERROCOMM_BF16);
FERROCOMM_HPP_DTYPE(float, FERROCOMM_F32);
FERROCOMM_HPP_DTYPE(double, FERROCOMM_F64);
#undef FERROCOMM_HPP_DTYPE

/// Types that ferrocomm can send, receive and reduce.
template <class T>
concept Element = requires { dtype_of<std::remove_cv_t<T>>::value; };

/// A contiguous range of elements (vector, array, span, C array): a buffer.
template <class R>
concept Buffer = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
                 Element<std::ranges::range_value_t<R>>;

/// A buffer whose elements may be written.
template <class R>
concept MutableBuffer =
    Buffer<R> && !std::is_const_v<std::remove_reference_t<std::ranges::range_reference_t<R>>>;

/// The data type code of a buffer's elements.
template <Buffer R> constexpr ferrocomm_dtype dtype_v =
    dtype_of<std::remove_cv_t<std::ranges::range_value_t<R>>>::value;

/// What a completed operation reports: source, tag, bytes, error.
using Status = ferrocomm_status_t;

/// Receive from any rank / with any tag.
inline constexpr std::int64_t any_source = FERROCOMM_ANY_SOURCE;
inline constexpr std::int64_t any_tag = FERROCOMM_ANY_TAG;

/// Reduction operations (ferrocomm_op).
enum class Op : std::uint32_t {
    sum = FERROCOMM_SUM,
    prod = FERROCOMM_PROD,
    max = FERROCOMM_MAX,
    min = FERROCOMM_MIN,
    avg = FERROCOMM_AVG, ///< floating-point types only
};

namespace detail {
template <class R> auto span_of(R &r) {
    return std::span(std::ranges::data(r), std::ranges::size(r));
}
inline void require(bool ok, const std::string &what) {
    if (!ok) throw Error(FERROCOMM_ERR_INVALID_ARGUMENT, "invalid argument: " + what);
}
template <class S, class R> constexpr bool same_dtype = dtype_v<S> == dtype_v<R>;
} // namespace detail

/// A non-blocking operation (ferrocomm_request_t). Move-only; its destructor releases it
/// (ferrocomm_request_free: withdraws a receive nothing matched, else waits).
class [[nodiscard]] Request {
  public:
    Request() noexcept = default;
    /// Takes ownership of a C handle.
    explicit Request(ferrocomm_request_t *h) noexcept : h_(h) {}
    Request(Request &&o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    Request &operator=(Request &&o) noexcept {
        if (this != &o) {
            reset();
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    Request(const Request &) = delete;
    Request &operator=(const Request &) = delete;
    ~Request() { reset(); }

    /// Waits for completion (ferrocomm_wait); the request is empty afterwards.
    Status wait() {
        Status st{};
        check(ferrocomm_wait(take(), &st));
        return st;
    }

    /// The status if complete (the request is then empty), nothing if still in flight
    /// (ferrocomm_test).
    std::optional<Status> test() {
        int done = 0;
        Status st{};
        ferrocomm_result r = ferrocomm_test(h_, &done, &st);
        if (done) h_ = nullptr;
        check(r);
        return done ? std::optional<Status>(st) : std::nullopt;
    }

    /// Whether the request still holds an operation.
    explicit operator bool() const noexcept { return h_ != nullptr; }
    /// The C handle (still owned by this Request).
    ferrocomm_request_t *handle() const noexcept { return h_; }
    /// Gives up ownership of the C handle.
    ferrocomm_request_t *release() noexcept { return std::exchange(h_, nullptr); }

  private:
    ferrocomm_request_t *take() {
        if (!h_) throw Error(FERROCOMM_ERR_INVALID_HANDLE, "empty ferrocomm::Request");
        return std::exchange(h_, nullptr);
    }
    void reset() noexcept {
        if (h_) (void)ferrocomm_request_free(std::exchange(h_, nullptr));
    }
    ferrocomm_request_t *h_ = nullptr;
};

/// Waits for every request (ferrocomm_waitall); all are empty afterwards. Throws the first
/// failure after all have finished.
inline std::vector<Status> wait_all(std::span<Request> reqs) {
    std::vector<ferrocomm_request_t *> hs;
    hs.reserve(reqs.size());
    for (auto &r : reqs) hs.push_back(r.handle());
    std::vector<Status> st(reqs.size());
    ferrocomm_result r = ferrocomm_waitall(hs.size(), hs.data(), st.data());
    if (r != FERROCOMM_ERR_INVALID_HANDLE) {
        for (auto &q : reqs) (void)q.release(); // consumed by waitall
    }
    check(r);
    return st;
}

/// A communicator (ferrocomm_comm_t). Move-only; its destructor releases the handle.
class Communicator {
  public:
    /// Joins the job described by the environment (ferrocomm_init).
    static Communicator init() {
        ferrocomm_comm_t *h = nullptr;
        check(ferrocomm_init(&h));
        return Communicator(h);
    }
    /// Joins through an init method URL (ferrocomm_init_url); -1: from the environment.
    static Communicator init(const std::string &url, std::int64_t world_size = -1,
                             std::int64_t rank = -1) {
        ferrocomm_comm_t *h = nullptr;
        check(ferrocomm_init_url(url.c_str(), world_size, rank, &h));
        return Communicator(h);
    }

    /// Takes ownership of a C handle.
    explicit Communicator(ferrocomm_comm_t *h) noexcept : h_(h) {}
    Communicator(Communicator &&o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    Communicator &operator=(Communicator &&o) noexcept {
        if (this != &o) {
            reset();
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    Communicator(const Communicator &) = delete;
    Communicator &operator=(const Communicator &) = delete;
    ~Communicator() { reset(); }

    std::size_t rank() const { return query(ferrocomm_comm_rank); }
    std::size_t size() const { return query(ferrocomm_comm_size); }
    std::size_t local_rank() const { return query(ferrocomm_comm_local_rank); }
    std::size_t local_size() const { return query(ferrocomm_comm_local_size); }
    std::size_t node_index() const { return query(ferrocomm_comm_node_index); }

    /// Same ranks, separate messages (ferrocomm_comm_dup); one per thread.
    Communicator dup() const {
        ferrocomm_comm_t *h = nullptr;
        check(ferrocomm_comm_dup(h_, &h));
        return Communicator(h);
    }
    /// Aborts every communicator of this world (ferrocomm_comm_abort); any thread.
    void abort(const std::string &reason) const {
        check(ferrocomm_comm_abort(h_, reason.c_str()));
    }
    /// Waits for every rank (ferrocomm_barrier).
    void barrier() const { check(ferrocomm_barrier(h_)); }

    /// Sends `buf` to `dst` (ferrocomm_send).
    template <Buffer R> void send(const R &buf, std::size_t dst, std::uint32_t tag) const {
        std::span s(std::ranges::data(buf), std::ranges::size(buf));
        check(ferrocomm_send(h_, s.data(), s.size(), dtype_v<R>, dst, tag));
    }
    /// Receives into `buf` (ferrocomm_recv).
    template <MutableBuffer R>
    Status recv(R &&buf, std::int64_t src = any_source, std::int64_t tag = any_tag) const {
        std::span s(std::ranges::data(buf), std::ranges::size(buf));
        Status st{};
        check(ferrocomm_recv(h_, s.data(), s.size(), dtype_v<R>, src, tag, &st));
        return st;
    }
    /// Sends and receives at once (ferrocomm_sendrecv); both buffers of one element type.
    template <Buffer S, MutableBuffer R>
        requires(dtype_v<S> == dtype_v<R>)
    Status sendrecv(const S &sendbuf, std::size_t dst, std::uint32_t sendtag, R &&recvbuf,
                    std::int64_t src, std::int64_t recvtag) const {
        std::span s(std::ranges::data(sendbuf), std::ranges::size(sendbuf));
        std::span r(std::ranges::data(recvbuf), std::ranges::size(recvbuf));
        Status st{};
        check(ferrocomm_sendrecv(h_, s.data(), s.size(), dtype_v<S>, dst, sendtag, r.data(),
                                 r.size(), src, recvtag, &st));
        return st;
    }
    /// Starts a send (ferrocomm_isend); `buf` must outlive the Request.
    template <Buffer R> Request isend(const R &buf, std::size_t dst, std::uint32_t tag) const {
        std::span s(std::ranges::data(buf), std::ranges::size(buf));
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_isend(h_, s.data(), s.size(), dtype_v<R>, dst, tag, &h));
        return Request(h);
    }
    /// Starts a receive (ferrocomm_irecv); `buf` must outlive the Request.
    template <MutableBuffer R>
    Request irecv(R &&buf, std::int64_t src = any_source, std::int64_t tag = any_tag) const {
        std::span s(std::ranges::data(buf), std::ranges::size(buf));
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_irecv(h_, s.data(), s.size(), dtype_v<R>, src, tag, &h));
        return Request(h);
    }

    // ---- collectives (ferrocomm_allreduce ...; every rank calls them in the same order) --

    /// Reduces `buf` over every rank, in place (ferrocomm_allreduce with
    /// FERROCOMM_IN_PLACE).
    template <MutableBuffer R> void all_reduce(R &buf, Op op = Op::sum) const {
        auto b = detail::span_of(buf);
        check(ferrocomm_allreduce(h_, FERROCOMM_IN_PLACE, b.data(), b.size(), dtype_v<R>,
                                  ferrocomm_op(op)));
    }
    /// Reduces `send` over every rank into `recv` (same length).
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void all_reduce(const S &send, R &recv, Op op = Op::sum) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(s.size() == r.size(), "all_reduce: recv must be as long as send");
        check(ferrocomm_allreduce(h_, s.data(), r.data(), s.size(), dtype_v<R>,
                                  ferrocomm_op(op)));
    }
    /// Copies the root's `buf` to every rank (ferrocomm_broadcast).
    template <MutableBuffer R> void broadcast(R &buf, std::size_t root) const {
        auto b = detail::span_of(buf);
        check(ferrocomm_broadcast(h_, b.data(), b.size(), dtype_v<R>, root));
    }
    /// Reduces every rank's `send` into the root's `recv` (ignored elsewhere; may be empty).
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void reduce(const S &send, R &recv, Op op, std::size_t root) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(rank() != root || r.size() == s.size(),
                        "reduce: recv must be as long as send at the root");
        check(ferrocomm_reduce(h_, s.data(), r.data(), s.size(), dtype_v<R>, ferrocomm_op(op),
                               root));
    }
    /// In-place reduce: `buf` is the contribution, and at the root the result.
    template <MutableBuffer R> void reduce(R &buf, Op op, std::size_t root) const {
        auto b = detail::span_of(buf);
        check(ferrocomm_reduce(h_, FERROCOMM_IN_PLACE, b.data(), b.size(), dtype_v<R>,
                               ferrocomm_op(op), root));
    }
    /// Gathers every rank's `send` into every rank's `recv` (size() blocks).
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void all_gather(const S &send, R &recv) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(r.size() == s.size() * size(),
                        "all_gather: recv must hold size() blocks of send's length");
        check(ferrocomm_allgather(h_, s.data(), r.data(), s.size(), dtype_v<R>));
    }
    /// In-place all_gather: `buf` holds size() blocks, this rank's already in place.
    template <MutableBuffer R> void all_gather(R &buf) const {
        auto b = detail::span_of(buf);
        detail::require(b.size() % size() == 0, "all_gather: buf must hold size() blocks");
        check(ferrocomm_allgather(h_, FERROCOMM_IN_PLACE, b.data(), b.size() / size(),
                                  dtype_v<R>));
    }
    /// Reduces every rank's `send` (size() blocks) and leaves block rank() in `recv`.
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void reduce_scatter(const S &send, R &recv, Op op = Op::sum) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(s.size() == r.size() * size(),
                        "reduce_scatter: send must hold size() blocks of recv's length");
        check(ferrocomm_reduce_scatter(h_, s.data(), r.data(), r.size(), dtype_v<R>,
                                       ferrocomm_op(op)));
    }
    /// Gathers every rank's `send` into the root's `recv` (size() blocks; ignored elsewhere).
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void gather(const S &send, R &recv, std::size_t root) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(rank() != root || r.size() == s.size() * size(),
                        "gather: recv must hold size() blocks of send's length at the root");
        check(ferrocomm_gather(h_, s.data(), r.data(), s.size(), dtype_v<R>, root));
    }
    /// Sends block i of the root's `send` (size() blocks; ignored elsewhere) to rank i's
    /// `recv`.
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void scatter(const S &send, R &recv, std::size_t root) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(rank() != root || s.size() == r.size() * size(),
                        "scatter: send must hold size() blocks of recv's length at the root");
        check(ferrocomm_scatter(h_, s.data(), r.data(), r.size(), dtype_v<R>, root));
    }
    /// Sends block j of `send` to rank j, which stores it as block rank() of `recv`.
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    void all_to_all(const S &send, R &recv) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(s.size() == r.size() && s.size() % size() == 0,
                        "all_to_all: send and recv must hold size() equal blocks");
        check(ferrocomm_alltoall(h_, s.data(), r.data(), s.size() / size(), dtype_v<R>));
    }
    /// All-reduces many buffers of one type at once, packed into buckets
    /// (ferrocomm_allreduce_many; bucket_bytes 0: 25 MiB).
    template <Element T>
    void all_reduce_many(std::span<const std::span<T>> bufs, Op op = Op::sum,
                         std::size_t bucket_bytes = 0) const {
        std::vector<void *> ptrs;
        std::vector<std::size_t> counts;
        for (auto b : bufs) {
            ptrs.push_back(b.data());
            counts.push_back(b.size());
        }
        check(ferrocomm_allreduce_many(h_, ptrs.data(), counts.data(), ptrs.size(),
                                       dtype_of<std::remove_cv_t<T>>::value, ferrocomm_op(op),
                                       bucket_bytes));
    }

    // ---- non-blocking collectives: the result lands in the buffer when the Request
    // completes (wait/test/wait_all); do not touch the buffer until then. A Request destroyed
    // before completion lets the collective finish but never writes the buffer.

    /// Starts an in-place all_reduce of `buf` (ferrocomm_iallreduce).
    template <MutableBuffer R> Request iall_reduce(R &buf, Op op = Op::sum) const {
        auto b = detail::span_of(buf);
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_iallreduce(h_, FERROCOMM_IN_PLACE, b.data(), b.size(), dtype_v<R>,
                                   ferrocomm_op(op), &h));
        return Request(h);
    }
    /// Starts an all_reduce of `send` into `recv` (send is copied at once).
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    Request iall_reduce(const S &send, R &recv, Op op = Op::sum) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(s.size() == r.size(), "iall_reduce: recv must be as long as send");
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_iallreduce(h_, s.data(), r.data(), s.size(), dtype_v<R>,
                                   ferrocomm_op(op), &h));
        return Request(h);
    }
    /// Starts a broadcast of the root's `buf` (ferrocomm_ibroadcast).
    template <MutableBuffer R> Request ibroadcast(R &buf, std::size_t root) const {
        auto b = detail::span_of(buf);
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_ibroadcast(h_, b.data(), b.size(), dtype_v<R>, root, &h));
        return Request(h);
    }
    /// Starts an all_gather of `send` into `recv` (ferrocomm_iallgather).
    template <Buffer S, MutableBuffer R>
        requires detail::same_dtype<S, R>
    Request iall_gather(const S &send, R &recv) const {
        auto s = detail::span_of(send);
        auto r = detail::span_of(recv);
        detail::require(r.size() == s.size() * size(),
                        "iall_gather: recv must hold size() blocks of send's length");
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_iallgather(h_, s.data(), r.data(), s.size(), dtype_v<R>, &h));
        return Request(h);
    }
    /// Starts a barrier (ferrocomm_ibarrier).
    Request ibarrier() const {
        ferrocomm_request_t *h = nullptr;
        check(ferrocomm_ibarrier(h_, &h));
        return Request(h);
    }

    // ---- sub-communicators ----

    /// Splits by color (ferrocomm_comm_split); nothing for a rank passing std::nullopt.
    std::optional<Communicator> split(std::optional<std::uint32_t> color,
                                      std::int64_t key = 0) const {
        ferrocomm_comm_t *h = nullptr;
        check(ferrocomm_comm_split(h_, color ? std::int64_t(*color) : FERROCOMM_UNDEFINED, key,
                                   &h));
        if (!h) return std::nullopt;
        return Communicator(h);
    }
    /// A communicator of some ranks, numbered in the order given (ferrocomm_comm_create_group;
    /// only the members call it).
    Communicator create_group(std::span<const std::size_t> ranks) const {
        ferrocomm_comm_t *h = nullptr;
        check(ferrocomm_comm_create_group(h_, ranks.data(), ranks.size(), &h));
        return Communicator(h);
    }

    /// The C handle (still owned by this Communicator).
    ferrocomm_comm_t *handle() const noexcept { return h_; }
    /// Gives up ownership of the C handle.
    ferrocomm_comm_t *release() noexcept { return std::exchange(h_, nullptr); }

  private:
    std::size_t query(ferrocomm_result (*f)(ferrocomm_comm_t *, std::size_t *)) const {
        std::size_t v = 0;
        check(f(h_, &v));
        return v;
    }
    void reset() noexcept {
        if (h_) (void)ferrocomm_comm_free(std::exchange(h_, nullptr));
    }
    ferrocomm_comm_t *h_ = nullptr;
};

/// Releases every handle (ferrocomm_finalize); Communicator and Request objects that
/// outlive it are empty shells whose destructors do nothing harmful.
inline void finalize() { check(ferrocomm_finalize()); }

/// This rank's indices into a data set of `len` examples for epoch `epoch`
/// (ferrocomm_sampler_indices, like PyTorch's DistributedSampler).
inline std::vector<std::uint64_t> sampler_indices(std::uint64_t len, std::uint64_t world,
                                                  std::uint64_t rank, std::uint64_t seed,
                                                  std::uint64_t epoch, bool shuffle = true,
                                                  bool drop_last = false) {
    std::uint32_t flags = (shuffle ? 0u : FERROCOMM_SAMPLER_NO_SHUFFLE) |
                          (drop_last ? FERROCOMM_SAMPLER_DROP_LAST : 0u);
    std::size_t n = 0;
    check(ferrocomm_sampler_indices(len, world, rank, seed, epoch, flags, nullptr, 0, &n));
    std::vector<std::uint64_t> out(n);
    check(ferrocomm_sampler_indices(len, world, rank, seed, epoch, flags, out.data(), n, &n));
    return out;
}

} // namespace ferrocomm

#endif // FERROCOMM_HPP
