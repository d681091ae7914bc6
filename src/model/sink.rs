//! Streaming protobuf encoding into a file.
//!
//! [`Sink`] is a `BufMut` over a file: prost encodes a whole model into it without the model's
//! bytes ever being gathered in memory. Small fields collect in a 1 MiB buffer. A large byte
//! slice (a tensor's `raw_data`) that lies inside one of the memory-mapped files the model was
//! loaded from is copied file to file by the kernel (`copy_file_range` on Linux), so untouched
//! weights go from the input file to the output without passing through this process: no
//! copy, and none of their pages counted in its memory. Anything else is written from memory.

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes};
use std::fs::File;
use std::io::Write;
use std::sync::Arc;

/// A memory-mapped file a model's bytes come from: the map and the open file behind it.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    pub map: Bytes,
    pub file: Arc<File>,
    /// The file's path, as it was opened.
    pub path: std::path::PathBuf,
}

impl Source {
    /// The offset of `s` in this file, if `s` lies inside the map.
    pub(crate) fn offset_of(&self, s: &[u8]) -> Option<u64> {
        let base = self.map.as_ptr() as usize;
        let p = s.as_ptr() as usize;
        (p >= base && p.checked_add(s.len())? <= base + self.map.len()).then(|| (p - base) as u64)
    }
}

/// Drop this process's mapping of the pages that lie wholly inside `s`, if `s` is a slice of
/// one of `sources`: a weight that was decoded once need not stay resident (it stays in the
/// page cache; reading it again faults it back in). Keeps the resident set of a fuse to the
/// weights it writes, not the whole input. Done on a thread of its own (the caller goes on at
/// once), which holds `s` — and with it the mapping — until the pages are let go. At most
/// [`RELEASE_QUEUE`] slices wait for it (the caller waits beyond that), so a model's map outlives
/// the model by no more than that backlog.
pub(crate) fn release(sources: &[Source], s: &Bytes) {
    #[cfg(target_os = "linux")]
    if sources.iter().any(|src| src.offset_of(s).is_some()) {
        static WORKER: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Bytes>>> = std::sync::OnceLock::new();
        let worker = WORKER.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(RELEASE_QUEUE);
            let spawned = std::thread::Builder::new()
                .name("acnet-onnx-release".into())
                .spawn(move || rx.into_iter().for_each(|b| drop_pages(&b)));
            spawned.ok().map(|_| tx)
        });
        match worker {
            Some(tx) if tx.send(s.clone()).is_ok() => {}
            _ => drop_pages(s),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (sources, s);
}

/// How many slices may wait for the release worker.
#[cfg(target_os = "linux")]
const RELEASE_QUEUE: usize = 256;

/// `MADV_DONTNEED` on the pages wholly inside `s`, a slice of a source's map (kept alive by `s`).
#[cfg(target_os = "linux")]
fn drop_pages(s: &Bytes) {
    // SAFETY: sysconf has no preconditions
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = (s.as_ptr() as usize).div_ceil(page) * page;
    let end = (s.as_ptr() as usize + s.len()) / page * page;
    if end > start {
        // SAFETY: the range is page-aligned and inside a live read-only file mapping (the
        // source's map, kept alive by `s`, a slice of it); MADV_DONTNEED on such a mapping only
        // drops page-table entries, and later reads see the file's bytes again.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

const BUF: usize = 1 << 20;
/// Slices at least this long go straight to the file (and file to file when they can).
const BIG: usize = 64 << 10;

/// The disk is handed what was written every this many bytes, while the rest is being written.
const KICK: u64 = 8 << 20;

/// Start writing `len` bytes of `out` from `from` to the disk, without waiting (Linux's
/// `sync_file_range`, `SYNC_FILE_RANGE_WRITE`): the fsync that makes the file durable then finds
/// most of it written. A hint: an error is the fsync's to report.
fn kick(out: &File, from: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open (borrowed from `out`); the call reads no memory of ours
        unsafe { libc::sync_file_range(out.as_raw_fd(), from as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (out, from, len);
}

pub(crate) struct Sink<'a> {
    out: &'a File,
    buf: Vec<u8>,
    sources: &'a [Source],
    /// `copy_file_range` failed as unsupported once: write from memory from then on
    no_copy_range: bool,
    /// the first write error; later writes are skipped, [`Sink::finish`] returns it
    err: Option<std::io::Error>,
    /// bytes written so far, and how many of them were handed to the disk ([`Sink::kick`])
    wrote: u64,
    kicked: u64,
}

impl<'a> Sink<'a> {
    pub fn new(out: &'a File, sources: &'a [Source]) -> Sink<'a> {
        Sink { out, buf: Vec::with_capacity(BUF), sources, no_copy_range: false, err: None, wrote: 0, kicked: 0 }
    }

    fn write(&mut self, s: &[u8]) {
        if self.err.is_none() {
            match self.out.write_all(s) {
                Ok(()) => self.wrote(s.len()),
                Err(e) => self.err = Some(e),
            }
        }
    }

    /// `n` more bytes are in the file: every [`KICK`] bytes, start writing them to the disk.
    fn wrote(&mut self, n: usize) {
        self.wrote += n as u64;
        if self.wrote - self.kicked >= KICK {
            kick(self.out, self.kicked, self.wrote - self.kicked);
            self.kicked = self.wrote;
        }
    }

    fn flush_buf(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.write(&buf);
        self.buf = buf;
        self.buf.clear();
    }

    /// Write a large slice: file to file when it lies in a source, else from memory.
    fn write_big(&mut self, s: &[u8]) {
        self.flush_buf();
        if self.err.is_some() {
            return;
        }
        if !self.no_copy_range {
            if let Some((src, off)) = self.sources.iter().find_map(|src| Some((src, src.offset_of(s)?))) {
                match copy_range(&src.file, off, self.out, s.len()) {
                    Ok(n) if n == s.len() => return self.wrote(n),
                    // the rest from memory (a source shorter than its map was truncated under us;
                    // reading the map then fails loudly, as any read of it would)
                    Ok(n) => {
                        self.wrote(n);
                        return self.write(&s[n..]);
                    }
                    Err(e) if unsupported(&e) => self.no_copy_range = true,
                    Err(e) => {
                        self.err = Some(e);
                        return;
                    }
                }
            }
        }
        self.write(s);
    }

    /// Flush what is buffered; the first error of any write.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.flush_buf();
        match self.err.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity, and `advance_mut` only marks as
// initialised what the caller wrote into it (at most that capacity).
unsafe impl BufMut for Sink<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len();
        assert!(len + cnt <= self.buf.capacity());
        // SAFETY: see the impl
        unsafe { self.buf.set_len(len + cnt) };
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, s: &[u8]) {
        if s.len() >= BIG {
            return self.write_big(s);
        }
        if self.buf.len() + s.len() > self.buf.capacity() {
            self.flush_buf();
        }
        self.buf.extend_from_slice(s);
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let c = src.chunk();
            let n = c.len();
            self.put_slice(c);
            src.advance(n);
        }
    }
}

/// Write `bytes` through a [`Sink`] (so slices of a source are copied file to file).
pub(crate) fn write_all(out: &File, sources: &[Source], chunks: &[Bytes]) -> std::io::Result<()> {
    let mut sink = Sink::new(out, sources);
    for c in chunks {
        sink.put_slice(c);
    }
    sink.finish()
}

fn unsupported(e: &std::io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::EBADF | libc::EPERM)
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        true
    }
}

/// Copy `len` bytes at `off` of `from` to the current position of `to`, in the kernel. Returns
/// how many bytes were copied (fewer only when `from` ends early).
#[cfg(target_os = "linux")]
fn copy_range(from: &File, off: u64, to: &File, len: usize) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut off_in = off as libc::loff_t;
    let mut done = 0;
    while done < len {
        // SAFETY: plain syscall on two open descriptors; the kernel advances `off_in` and the
        // output file's position.
        let n = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), std::ptr::null_mut(), len - done, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if done > 0 && unsupported(&e) {
                // partly copied already: report the progress, the rest goes from memory
                return Ok(done);
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

#[cfg(not(target_os = "linux"))]
fn copy_range(_from: &File, _off: u64, _to: &File, _len: usize) -> std::io::Result<usize> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}
