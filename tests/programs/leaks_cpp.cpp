// Exact-mode test program in C++: leaks through new, new[], aligned new,
// std::vector and std::string growth and an exception path, at named
// functions, from two threads that also churn standard containers. Sizes
// that depend on libstdc++'s growth policy are printed as "expect" lines and
// read by tests/exact.rs.
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

struct Foo {
    char data[48];
};

struct alignas(64) Aligned {
    char data[192];
};

static std::mutex expect_lock;
static size_t vector_bytes, string_bytes;

// 5 x new Foo (48 bytes) per thread.
NOINLINE void make_foo() {
    for (int i = 0; i < 5; i++) keep(new Foo());
}

// 3 x new int[25] (100 bytes, no array cookie for a trivial type) per thread.
NOINLINE void make_array() {
    for (int i = 0; i < 3; i++) keep(new int[25]());
}

// 2 x new Aligned per thread: operator new(size_t, align_val_t), 192 bytes.
NOINLINE void make_aligned() {
    for (int i = 0; i < 2; i++) keep(new Aligned());
}

// A heap vector grown by push_back and never deleted: the vector object plus
// its final buffer; the buffers it outgrew were freed by the vector.
NOINLINE void leak_vector() {
    auto *v = new std::vector<int>();
    for (int i = 0; i < 100; i++) v->push_back(i);
    keep(v);
    std::lock_guard<std::mutex> g(expect_lock);
    vector_bytes = sizeof(*v) + v->capacity() * sizeof(int);
}

// Same for a std::string grown one character at a time.
NOINLINE void leak_string() {
    auto *s = new std::string();
    for (int i = 0; i < 300; i++) s->push_back('x');
    keep(s);
    std::lock_guard<std::mutex> g(expect_lock);
    string_bytes = sizeof(*s) + s->capacity() + 1;
}

NOINLINE void validate(int frame) {
    if (frame >= 0) throw std::runtime_error("bad frame");
}

// The error-path leak: the buffer is lost when validate throws. 64 bytes,
// 7 times per thread. The exception objects themselves are freed.
NOINLINE void encode_frame(int frame) {
    char *buf = new char[64];
    memset(buf, frame, 64);
    keep(buf);
    validate(frame);
    delete[] buf;
}

// Standard containers that are fully released: must not be reported.
NOINLINE void churn(uint64_t seed) {
    for (int round = 0; round < 200; round++) {
        std::map<int, std::string> m;
        std::vector<std::unique_ptr<Foo>> foos;
        for (int i = 0; i < 50; i++) {
            uint64_t r = xorshift64(&seed);
            m[(int)(r % 1000)] = std::string(16 + r % 200, 'm');
            foos.emplace_back(new Foo());
            if (r % 3 == 0) m.erase(m.begin());
        }
        auto shared = std::make_shared<std::vector<double>>(1000 + round);
        keep(shared.get());
    }
}

static void worker(uint64_t seed) {
    churn(seed);
    make_foo();
    make_array();
    make_aligned();
    churn(seed + 1);
    leak_vector();
    leak_string();
    for (int i = 0; i < 7; i++) {
        try {
            encode_frame(i);
        } catch (const std::exception &) {
        }
    }
    churn(seed + 2);
}

int main() {
    std::thread a(worker, 1), b(worker, 2);
    a.join();
    b.join();
    std::printf("expect leak_vector %zu 4\n", 2 * vector_bytes);
    std::printf("expect leak_string %zu 4\n", 2 * string_bytes);
    return 0;
}
