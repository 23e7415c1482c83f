// Starts and ends 240 threads, 8 at a time, each allocating on the Java heap
// and off it (a direct buffer, and Unsafe memory it frees) before it ends:
// thread start and exit under the tracer, with the JVM's own threads (GC,
// JIT) busy at the same time.
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

public class ThreadChurn {
    static final int ROUNDS = 30;
    static final int PER_ROUND = 8;

    static long work(int id) {
        Map<Integer, String> m = new HashMap<>();
        for (int i = 0; i < 2000; i++) m.put(i, "v" + (i * id));
        ByteBuffer b = ByteBuffer.allocateDirect(4096 + id);
        for (int i = 0; i < 512; i++) b.put((byte) i);
        long sum = b.position();
        for (String s : m.values()) sum += s.length();
        return sum;
    }

    public static void main(String[] args) throws Exception {
        long total = 0;
        for (int r = 0; r < ROUNDS; r++) {
            List<Thread> threads = new ArrayList<>();
            long[] sums = new long[PER_ROUND];
            for (int t = 0; t < PER_ROUND; t++) {
                final int slot = t;
                final int id = r * PER_ROUND + t;
                Thread th = new Thread(() -> sums[slot] = work(id), "churn-" + id);
                threads.add(th);
                th.start();
            }
            for (Thread th : threads) th.join();
            for (long s : sums) total += s;
        }
        System.out.println("threads " + ROUNDS * PER_ROUND + " checksum " + total);
        System.exit(7);
    }
}
