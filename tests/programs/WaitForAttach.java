// Prints its pid and "ready", then waits (doing a little native churn) until
// a line arrives on stdin, so a test can attach jcmd to it while it runs.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.ByteBuffer;

public class WaitForAttach {
    public static void main(String[] args) throws Exception {
        System.out.println("pid " + ProcessHandle.current().pid());
        System.out.println("ready");
        System.out.flush();
        Thread churn = new Thread(() -> {
            long n = 0;
            while (!Thread.currentThread().isInterrupted()) {
                n += ByteBuffer.allocateDirect(256).capacity();
                try {
                    Thread.sleep(1);
                } catch (InterruptedException e) {
                    break;
                }
            }
        }, "churn");
        churn.setDaemon(true);
        churn.start();
        String line = new BufferedReader(new InputStreamReader(System.in)).readLine();
        System.out.println("got " + line);
        System.exit(3);
    }
}
