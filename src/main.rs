//! The `epp` binary.

fn main() {
    println!("epp");
}
