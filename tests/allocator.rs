//! The allocator's settings (src/alloc.rs): the command line's, and the check's while it runs.
//! One test, alone in its process and on its main thread (`harness = false`: the main thread
//! allocates from the main arena, whose free memory `malloc_trim` hands back, as the command
//! line's one arena does): it reads the allocator's process-wide count of blocks mapped on
//! their own.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics
    unsafe { libc::mallinfo2() }.hblks
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
/// Whether an 8 MiB block is mapped on its own (not taken from the heap) when no free memory
/// is kept (as between the check's phases, which hand free memory back; the threshold only
/// decides what the heap grows for).
fn maps_8_mib() -> bool {
    // SAFETY: malloc_trim only returns free memory to the system
    unsafe { libc::malloc_trim(0) };
    let before = mapped_blocks();
    let v: Vec<u8> = Vec::with_capacity(8 << 20);
    let during = mapped_blocks();
    drop(std::hint::black_box(v));
    during > before
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_check_maps_large_blocks_on_their_own_until_the_last_check_ends() {
    acnet_onnx::tune_allocator(false);
    assert!(!maps_8_mib(), "the rewrite keeps blocks below 32 MiB on the heap, for reuse");
    let first = acnet_onnx::check_phase();
    assert!(maps_8_mib(), "a check maps blocks from 4 MiB on their own");
    let second = acnet_onnx::check_phase();
    drop(first);
    assert!(maps_8_mib(), "a check still running keeps its setting");
    drop(second);
    assert!(!maps_8_mib(), "the rewrite's setting is back when the last check ends");
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        a_check_maps_large_blocks_on_their_own_until_the_last_check_ends();
        println!("test a_check_maps_large_blocks_on_their_own_until_the_last_check_ends ... ok");
        // the line CI counts tests by (libtest's)
        println!("\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n");
    }
}
