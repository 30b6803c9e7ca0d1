// Collectives from C++ (ferrocomm.hpp): all_reduce in place and out of place, a
// non-blocking all_reduce overlapped with a broadcast, all_gather, and a sub-communicator
// of the even or odd ranks; every result is checked.
//
//   c++ -std=c++20 allreduce.cpp -lferrocomm -o allreduce_cpp
//   ferrorun --nproc-per-node 3 -- ./allreduce_cpp
#include <ferrocomm.hpp>

#include <array>
#include <cstdio>
#include <vector>

int main() try {
    auto comm = ferrocomm::Communicator::init();
    const std::size_t rank = comm.rank(), size = comm.size(), n = 4096;
    const double ranks_sum = double(size * (size + 1) / 2);
    std::size_t wrong = 0;

    std::vector<double> x(n), y(n);
    for (std::size_t i = 0; i < n; i++) x[i] = double((rank + 1) * (i % 5));
    comm.all_reduce(x, y, ferrocomm::Op::sum);
    for (std::size_t i = 0; i < n; i++) wrong += y[i] != ranks_sum * double(i % 5);

    comm.all_reduce(x, ferrocomm::Op::avg); // in place
    for (std::size_t i = 0; i < n; i++) wrong += x[i] != ranks_sum / double(size) * double(i % 5);

    // Non-blocking: a gradient all_reduce overlaps a broadcast on the blocking sequence.
    std::vector<float> grad(n, float(rank));
    auto pending = comm.iall_reduce(grad, ferrocomm::Op::max);
    std::array<std::int32_t, 3> cfg{};
    if (rank == 0) cfg = {7, 8, 9};
    comm.broadcast(cfg, 0);
    pending.wait();
    for (float g : grad) wrong += g != float(size - 1);
    wrong += cfg != std::array<std::int32_t, 3>{7, 8, 9};

    std::array<std::uint64_t, 1> mine{rank};
    std::vector<std::uint64_t> all(size);
    comm.all_gather(mine, all);
    for (std::size_t r = 0; r < size; r++) wrong += all[r] != r;

    if (auto half = comm.split(std::uint32_t(rank % 2))) {
        std::array<std::uint32_t, 1> one{1};
        half->all_reduce(one);
        wrong += one[0] != half->size();
    } else {
        wrong++;
    }

    std::printf("rank %zu of %zu: C++ collectives: %s\n", rank, size, wrong ? "WRONG" : "ok");
    return wrong ? 1 : 0;
} catch (const ferrocomm::Error &e) {
    std::fprintf(stderr, "allreduce.cpp: %s\n", e.what());
    return 1;
}
