// The JVM workload of scripts/bench.sh: a few threads churn native memory
// the way off-heap caches and network buffers do, through
// sun.misc.Unsafe.allocateMemory/reallocateMemory/freeMemory (malloc,
// realloc and free underneath) and, one time in 64, a direct ByteBuffer
// (malloc freed later by a Cleaner after GC). Each thread keeps a live
// working set of 2048 blocks. Deterministic (xorshift per thread).
//
//     java NativeChurn [threads (default 3)] [iterations per thread (default 2000000)]
import java.lang.reflect.Field;
import java.nio.ByteBuffer;

public final class NativeChurn {
    private static final int SLOTS = 2048;

    public static void main(String[] args) throws Exception {
        int threads = args.length > 0 ? Integer.parseInt(args[0]) : 3;
        long iterations = args.length > 1 ? Long.parseLong(args[1]) : 2_000_000L;
        Field f = sun.misc.Unsafe.class.getDeclaredField("theUnsafe");
        f.setAccessible(true);
        sun.misc.Unsafe unsafe = (sun.misc.Unsafe) f.get(null);
        long[] sums = new long[threads];
        Thread[] pool = new Thread[threads];
        for (int t = 0; t < threads; t++) {
            final int index = t;
            pool[t] = new Thread(() -> sums[index] = churn(unsafe, index, iterations));
            pool[t].start();
        }
        long sum = 0;
        for (int t = 0; t < threads; t++) {
            pool[t].join();
            sum += sums[t];
        }
        System.out.println("NativeChurn: " + threads + " threads, checksum " + sum);
    }

    private static long churn(sun.misc.Unsafe unsafe, int index, long iterations) {
        long seed = 0x9e3779b97f4a7c15L * (index + 1);
        long[] addr = new long[SLOTS];
        long[] size = new long[SLOTS];
        ByteBuffer[] direct = new ByteBuffer[SLOTS / 8];
        long sum = 0;
        for (long i = 0; i < iterations; i++) {
            seed ^= seed << 13; seed ^= seed >>> 7; seed ^= seed << 17;
            long r = seed;
            int k = (int) ((r >>> 40) % SLOTS);
            int bucket = (int) Long.remainderUnsigned(r, 1000);
            long n = bucket < 960 ? 16 + ((r >>> 20) & 255) : 257 + ((r >>> 20) % 16128);
            if ((r & 63) == 0) {
                ByteBuffer b = ByteBuffer.allocateDirect((int) n);
                b.put(0, (byte) i);
                direct[k % direct.length] = b;
                sum += b.get(0);
                continue;
            }
            if (addr[k] != 0 && (r & 3) == 0) {
                addr[k] = unsafe.reallocateMemory(addr[k], n);
            } else {
                if (addr[k] != 0) unsafe.freeMemory(addr[k]);
                addr[k] = unsafe.allocateMemory(n);
            }
            size[k] = n;
            unsafe.putByte(addr[k], (byte) i);
            unsafe.putByte(addr[k] + n - 1, (byte) (i >>> 8));
            sum += unsafe.getByte(addr[k]) + unsafe.getByte(addr[k] + n - 1);
        }
        for (int k = 0; k < SLOTS; k++) if (addr[k] != 0) unsafe.freeMemory(addr[k]);
        return sum;
    }
}
