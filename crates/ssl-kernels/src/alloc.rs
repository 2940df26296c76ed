//! The allocator setting of our binaries: mimalloc keeps the memory it frees.

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (`include/mimalloc.h`); the sys crate
/// names no constant for it. A unit test checks the index against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the kernel, unless the user set
/// `MIMALLOC_PURGE_DELAY` (which then wins). Call it first thing in `main` of a binary whose
/// global allocator is `mimalloc::MiMalloc`; elsewhere it only configures an unused allocator.
///
/// Why: a training step frees and re-allocates the same large tensors every step. With
/// mimalloc's default (purge after 1 s) each step's big buffers went back to the kernel and
/// came back as fresh pages, zeroed in the page-fault handler: 14,898 page faults and 7% of an
/// MLM step's time in `clear_page_erms` (`perf record`, `cargo bench -p ssl-cli --bench suite
/// -- --only mlm_train --precision bf16`); 457 faults with the purge off. The price is that
/// the process keeps its peak footprint until it exits, as PyTorch's caching allocators do.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is a plain store into mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_index_names_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set");
            return;
        }
        // SAFETY: reading an option.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // mimalloc v3's default purge delay is 1000 ms; no other option defaults to 1000.
        assert_eq!(
            before, 1000,
            "option {MI_OPTION_PURGE_DELAY} is not the purge delay"
        );
        keep_freed_memory();
        // SAFETY: reading an option.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, -1);
    }
}
