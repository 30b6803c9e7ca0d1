// The C++ wrapper (ferrocomm.hpp): RAII handles, exceptions, ranges as buffers.
//
// Every rank takes its shard of a data set from the distributed sampler, and rank 0
// collects the shards with non-blocking receives and checks that they cover the data set
// exactly once; then a value goes around the ring with sendrecv.
//
//   c++ -std=c++20 shards.cpp -lferrocomm -o shards
//   ferrorun --nproc-per-node 3 -- ./shards
#include <ferrocomm.hpp>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <vector>

int main() try {
    auto comm = ferrocomm::Communicator::init();
    const std::size_t rank = comm.rank(), size = comm.size();
    const std::uint64_t len = 1000 * size; // divides evenly: no padding, no overlap

    // The same seed and epoch on every rank: disjoint shards, no data sent.
    auto mine = ferrocomm::sampler_indices(len, size, rank, /*seed=*/42, /*epoch=*/3);
    if (rank == 0) {
        std::vector<std::vector<std::uint64_t>> shards(size, std::vector<std::uint64_t>(mine.size()));
        std::vector<ferrocomm::Request> reqs;
        for (std::size_t r = 1; r < size; r++) reqs.push_back(comm.irecv(shards[r], std::int64_t(r), 5));
        shards[0] = mine;
        auto statuses = ferrocomm::wait_all(reqs);
        for (std::size_t i = 0; i < statuses.size(); i++) {
            if (statuses[i].source != i + 1 || statuses[i].bytes != mine.size() * 8) {
                std::fprintf(stderr, "shards: bad status from rank %zu\n", i + 1);
                return 1;
            }
        }
        std::vector<std::uint64_t> all;
        for (auto &s : shards) all.insert(all.end(), s.begin(), s.end());
        std::sort(all.begin(), all.end());
        std::vector<std::uint64_t> expect(len);
        std::iota(expect.begin(), expect.end(), 0);
        bool ok = all == expect;
        std::printf("%zu shards of %zu cover the data set exactly once: %s\n", size, mine.size(),
                    ok ? "ok" : "WRONG");
        if (!ok) return 1;
    } else {
        comm.send(mine, 0, 5);
    }

    // A ring shift with sendrecv: everyone gets its left neighbour's rank.
    std::vector<float> out(16, float(rank)), in(16, -1.0f);
    auto st = comm.sendrecv(out, (rank + 1) % size, 9, in, std::int64_t((rank + size - 1) % size), 9);
    const float left = float((rank + size - 1) % size);
    if (st.bytes != 64 || std::any_of(in.begin(), in.end(), [&](float v) { return v != left; })) {
        std::fprintf(stderr, "shards: rank %zu got the wrong ring values\n", rank);
        return 1;
    }

    // Errors are exceptions with the library's message.
    try {
        comm.send(out, size, 0); // no rank `size`
        std::fprintf(stderr, "shards: a send to a missing rank was accepted\n");
        return 1;
    } catch (const ferrocomm::Error &e) {
        if (e.code() != FERROCOMM_ERR_INVALID_ARGUMENT) throw;
    }
    comm.barrier();
    std::printf("rank %zu: ring ok\n", rank);
    return 0;
} catch (const ferrocomm::Error &e) {
    std::fprintf(stderr, "shards: %s\n", e.what());
    return 1;
}
