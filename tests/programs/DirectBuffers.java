// Keeps direct ByteBuffers: four threads open and release channel buffers
// (released at once through Unsafe.invokeCleaner, so they do not wait for a
// GC), also drop scratch buffers for the GC to clean whenever it likes, and
// finally keep 16 channel buffers each. The kept buffers are all the
// outstanding blocks of openChannelBuffer; tests/jvm.rs checks them.
//
// Capacities are multiples of 8, so malloc is asked for exactly the
// capacity: DirectByteBuffer allocates its capacity (no page alignment by
// default) and Unsafe_AllocateMemory0 rounds up to 8.
import java.lang.reflect.Field;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import sun.misc.Unsafe;

public class DirectBuffers {
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
    static final int WARMUP = 5000;
    static final int KEPT = 16;
    // Static, so the buffers stay reachable until the JVM exits: a local
    // list could be found dead after its last use and its buffers freed by
    // the Cleaner thread.
    static final List<ByteBuffer> kept = new ArrayList<>();

    static ByteBuffer openChannelBuffer(int capacity) {
        ByteBuffer b = ByteBuffer.allocateDirect(capacity);
        b.putLong(0, capacity);
        return b;
    }

    public static void main(String[] args) throws Exception {
        List<Thread> threads = new ArrayList<>();
        long[] sums = new long[THREADS];
        for (int t = 0; t < THREADS; t++) {
            final int id = t;
            Thread th = new Thread(() -> {
                long sum = 0;
                for (int i = 0; i < WARMUP; i++) {
                    ByteBuffer b = openChannelBuffer(64 + 8 * (i % 512));
                    sum += b.getLong(0);
                    U.invokeCleaner(b);
                    ByteBuffer scratch = ByteBuffer.allocateDirect(100 + i % 50);
                    sum += scratch.capacity();
                }
                List<ByteBuffer> mine = new ArrayList<>();
                for (int i = 0; i < KEPT; i++) {
                    ByteBuffer b = openChannelBuffer(65536 + 4096 * id + 8 * i);
                    mine.add(b);
                    sum += b.getLong(0);
                }
                synchronized (kept) {
                    kept.addAll(mine);
                }
                sums[id] = sum;
            }, "channel-" + t);
            threads.add(th);
            th.start();
        }
        for (Thread th : threads) th.join();
        long total = 0;
        for (long s : sums) total += s;
        long capacity = 0;
        for (ByteBuffer b : kept) capacity += b.capacity();
        System.out.println("checksum " + total);
        System.out.println("kept " + capacity + " " + kept.size());
    }
}
