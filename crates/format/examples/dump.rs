//! Prints every record of a trace, one per line: a debugging aid for the
//! format itself (`cargo run -p mtrace-format --example dump -- FILE`).
use std::io::BufReader;

fn main() {
    let path = std::env::args().nth(1).expect("usage: dump FILE");
    let f = std::fs::File::open(&path).expect("open");
    let mut d = mtrace_format::Decoder::new(BufReader::new(f)).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(2)
    });
    println!("{:?}", d.header());
    loop {
        match d.next() {
            Ok(Some(r)) => println!("{r:?}"),
            Ok(None) => break,
            Err(e) => {
                println!("error: {e}");
                break;
            }
        }
    }
    println!("ending: {:?}, {} records", d.ending(), d.records());
}
