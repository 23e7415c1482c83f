// Starts helper processes the way services do (ProcessBuilder: the JDK
// forks or spawns jspawnhelper, which execs the command), reads one's
// output, and exits with a code of its own.
import java.io.BufferedReader;
import java.io.InputStreamReader;

public class ForkHelper {
    public static void main(String[] args) throws Exception {
        Process t = new ProcessBuilder("/bin/true").start();
        System.out.println("true exited " + t.waitFor());
        Process e = new ProcessBuilder("/bin/echo", "from", "the", "helper").start();
        try (BufferedReader r = new BufferedReader(new InputStreamReader(e.getInputStream()))) {
            System.out.println("helper said: " + r.readLine());
        }
        System.out.println("echo exited " + e.waitFor());
        Process f = new ProcessBuilder("/bin/false").start();
        System.out.println("false exited " + f.waitFor());
        System.exit(5);
    }
}
