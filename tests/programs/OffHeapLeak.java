// Leaks native memory the way an off-heap codec does: four threads encode
// messages into Unsafe.allocateMemory buffers and free them, but the buffer
// encodeOnDisconnect returns is freed only while the connection is warm;
// after that its blocks are kept forever. The expected figures are in
// tests/jvm.rs (and printed by the program: "leaked <bytes> <objects>").
//
// Every size is a multiple of 8: HotSpot's Unsafe_AllocateMemory0 rounds the
// request up to a heap word before it calls malloc, and the tracer records
// what malloc was asked for.
import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.List;
import sun.misc.Unsafe;

public class OffHeapLeak {
    static final Unsafe U;

    static {
        try {
            Field f = Unsafe.class.getDeclaredField("theUnsafe");
            f.setAccessible(true);
            U = (Unsafe) f.get(null);
        } catch (ReflectiveOperationException e) {
            throw new ExceptionInInitializerError(e);
        }
    }

    static final int THREADS = 4;
    // Enough calls that the JIT has compiled encodeOnDisconnect (with
    // -Xbatch the calling thread waits for each compilation) before the
    // first block leaks: an interpreted frame has no method name.
    static final int WARMUP = 20000;
    static final int LEAKS = 25;
    static final List<Long> kept = new ArrayList<>();

    /** The leaking path: its blocks are freed during warm-up only. */
    static long encodeOnDisconnect(int size, byte tag) {
        long a = U.allocateMemory(size);
        U.setMemory(a, size, tag);
        return a;
    }

    /** The path that always frees. */
    static long encodeOnMessage(int size, byte tag) {
        long a = U.allocateMemory(size);
        U.setMemory(a, size, tag);
        return a;
    }

    static int leakSize(int thread, int i) {
        return 1024 + 64 * thread + 8 * i;
    }

    public static void main(String[] args) throws Exception {
        List<Thread> threads = new ArrayList<>();
        long[] sums = new long[THREADS];
        for (int t = 0; t < THREADS; t++) {
            final int id = t;
            Thread th = new Thread(() -> {
                long sum = 0;
                long seed = 0x9E3779B97F4A7C15L ^ id;
                for (int i = 0; i < WARMUP; i++) {
                    seed ^= seed << 13;
                    seed ^= seed >>> 7;
                    seed ^= seed << 17;
                    int size = 16 + (int) ((seed >>> 8) % 2000);
                    long m = encodeOnMessage(size, (byte) i);
                    sum += U.getByte(m + size - 1);
                    U.freeMemory(m);
                    long d = encodeOnDisconnect(8 * (1 + i % 300), (byte) id);
                    sum += U.getByte(d);
                    U.freeMemory(d);
                }
                List<Long> mine = new ArrayList<>();
                for (int i = 0; i < LEAKS; i++) {
                    long d = encodeOnDisconnect(leakSize(id, i), (byte) 1);
                    mine.add(d);
                    sum += U.getByte(d);
                }
                synchronized (kept) {
                    kept.addAll(mine);
                }
                sums[id] = sum;
            }, "codec-" + t);
            threads.add(th);
            th.start();
        }
        for (Thread th : threads) th.join();
        long total = 0;
        for (long s : sums) total += s;
        long bytes = 0;
        for (int t = 0; t < THREADS; t++) for (int i = 0; i < LEAKS; i++) bytes += leakSize(t, i);
        System.out.println("checksum " + total);
        System.out.println("leaked " + bytes + " " + kept.size());
    }
}
