//! The `lifecycle` command (`cli` in the library has the verbs).

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: dispatch allocates and frees a few 10 KB buffers per
/// email across threads (rendered on the blocking pool, sent from the async workers), where
/// glibc took about a sixth of the bench process's samples (`malloc_consolidate`,
/// `unlink_chunk`, `_int_free`). Without transparent huge pages (`no_thp`): they added 20–30
/// MiB to the peak.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    lifecycle::main()
}
