//! The guest's heap: a bump allocator over a 1 MiB static arena, with a free list so that
//! memory freed out of order can be used again (hot-plug cycles create and drop drivers for
//! ever), and a tiny spin lock.
//!
//! Every block is at least 16 bytes and 8-aligned, so a freed block can hold its free-list
//! node (next offset, size). Freeing the block at the top lowers the top (and then any free
//! blocks that end there); freeing any other block puts it on the free list, and an
//! allocation of exactly that size (suitably aligned) takes it back. Requests repeated with the
//! same sizes, as a driver's set-up is, therefore use no new memory. Blocks are never split or
//! merged otherwise.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// A minimal spin lock (the guest's Rust code runs on the boot CPU only, so it is never
/// contended; it keeps the statics sound).
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through `with`, which holds the lock.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        while self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.value.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

const HEAP_SIZE: usize = 1 << 20;
/// No free block: the list's end.
const NIL: usize = usize::MAX;

#[repr(C, align(4096))]
struct Arena([u8; HEAP_SIZE]);

static mut ARENA: Arena = Arena([0; HEAP_SIZE]);

fn base() -> usize {
    core::ptr::addr_of_mut!(ARENA) as usize
}

struct State {
    /// Offset of the first byte never handed out.
    top: usize,
    /// Offset of the first free block (NIL: none).
    free: usize,
}

/// A free block's first 16 bytes.
#[repr(C)]
struct Node {
    next: usize,
    size: usize,
}

fn node(off: usize) -> *mut Node {
    (base() + off) as *mut Node
}

/// The size and alignment a request really takes.
fn block(layout: Layout) -> (usize, usize) {
    (
        layout.size().max(16).next_multiple_of(8),
        layout.align().max(8),
    )
}

impl State {
    fn alloc(&mut self, size: usize, align: usize) -> Option<usize> {
        // An exact fit from the free list first.
        let mut prev: Option<usize> = None;
        let mut cur = self.free;
        while cur != NIL {
            // SAFETY: every offset on the list is a freed block of at least 16 bytes, 8-aligned.
            let n = unsafe { &*node(cur) };
            if n.size == size && (base() + cur).is_multiple_of(align) {
                match prev {
                    // SAFETY: as above.
                    Some(p) => unsafe { (*node(p)).next = n.next },
                    None => self.free = n.next,
                }
                return Some(cur);
            }
            prev = Some(cur);
            cur = n.next;
        }
        let start = (base() + self.top).next_multiple_of(align) - base();
        let end = start.checked_add(size).filter(|&e| e <= HEAP_SIZE)?;
        self.top = end;
        Some(start)
    }

    fn free(&mut self, start: usize, size: usize) {
        if start + size == self.top {
            self.top = start;
            // Free blocks that now end at the top go too.
            loop {
                let top = self.top;
                match self.unlink_where(|off, n| off + n.size == top) {
                    Some(b) => self.top = b,
                    None => break,
                }
            }
        } else {
            // SAFETY: the block was handed out with at least 16 bytes, 8-aligned, and is now
            // ours again.
            unsafe {
                node(start).write(Node {
                    next: self.free,
                    size,
                })
            };
            self.free = start;
        }
    }

    /// Takes the first free block for which `f` holds off the list; returns its offset.
    fn unlink_where(&mut self, f: impl Fn(usize, &Node) -> bool) -> Option<usize> {
        let mut prev: Option<usize> = None;
        let mut cur = self.free;
        while cur != NIL {
            // SAFETY: see `alloc`.
            let n = unsafe { &*node(cur) };
            if f(cur, n) {
                match prev {
                    // SAFETY: see `alloc`.
                    Some(p) => unsafe { (*node(p)).next = n.next },
                    None => self.free = n.next,
                }
                return Some(cur);
            }
            prev = Some(cur);
            cur = n.next;
        }
        None
    }
}

pub struct Heap {
    state: SpinLock<State>,
}

// SAFETY: `alloc` hands out disjoint, suitably aligned ranges of the arena: each is either
// above every range handed out before (the top only grows there) or a block that was freed
// and is taken off the free list; `dealloc` gives a range back exactly once.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = block(layout);
        match self.state.with(|s| s.alloc(size, align)) {
            Some(off) => (base() + off) as *mut u8,
            None => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (size, _) = block(layout);
        let start = ptr as usize - base();
        self.state.with(|s| s.free(start, size));
    }

    /// The block at the top grows or shrinks in place (a growing `Vec` or `String`, the last
    /// thing allocated); any other moves.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, align) = block(layout);
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return core::ptr::null_mut();
        };
        let (new, _) = block(new_layout);
        let start = ptr as usize - base();
        let in_place = self.state.with(|s| {
            if start + old == s.top && start + new <= HEAP_SIZE {
                s.top = start + new;
                true
            } else {
                false
            }
        });
        if in_place {
            return ptr;
        }
        let Some(off) = self.state.with(|s| s.alloc(new, align)) else {
            return core::ptr::null_mut();
        };
        let dst = (base() + off) as *mut u8;
        // SAFETY: both blocks are ours, distinct, and at least min(old, new) bytes long.
        unsafe { core::ptr::copy_nonoverlapping(ptr, dst, layout.size().min(new_size)) };
        self.state.with(|s| s.free(start, old));
        dst
    }
}

#[global_allocator]
static ALLOCATOR: Heap = Heap {
    state: SpinLock::new(State { top: 0, free: NIL }),
};

/// Bytes below the top and bytes on the free list (for diagnostics).
pub fn usage() -> (usize, usize) {
    ALLOCATOR.state.with(|s| {
        let mut listed = 0;
        let mut cur = s.free;
        while cur != NIL {
            // SAFETY: see `State::alloc`.
            let n = unsafe { &*node(cur) };
            listed += n.size;
            cur = n.next;
        }
        (s.top, listed)
    })
}
