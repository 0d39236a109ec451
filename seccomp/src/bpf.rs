//! The BPF programs our filters install, laid out as a search tree over system call numbers.
//!
//! `seccompiler` lays a filter out as one comparison after another, one per allowed call: a
//! call near the end of a list of 200 walks 400 instructions. The kernel pays for that length
//! when a filter is installed: it runs the program over every system call number to find the
//! calls it may allow without running the filter at all (the action cache), then compiles it.
//! That took 0.4-0.5 ms per filter on our build machine, three filters on the way to a guest's
//! first instruction. A tree over the same numbers makes any call's walk about 20 instructions
//! and the program about half as long (runs of consecutive numbers are one range test).
//! `libseccomp` can build trees, but building and loading a filter with it measured slower
//! still (0.6-0.9 ms for 150-190 calls), so the programs are made here, and `seccompiler`
//! still installs them. `bpf_tests.rs` runs each program beside `seccompiler`'s for the same
//! filter on every call number and ioctl request they could tell apart.

use seccompiler::{sock_filter, BpfProgram};

// Classic BPF, `linux/bpf_common.h`: the instructions a seccomp program is made of.
// (LD is class 0 and W size 0: the load is its mode alone.)
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
const BPF_JA: u16 = 0x05;
const BPF_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JGT_K: u16 = 0x05 | 0x20;
const BPF_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

/// Offsets in `struct seccomp_data`: the call number, the architecture, and the low half of
/// the second argument (an ioctl's request: the kernel takes it as an `unsigned int`).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG1_LOW: u32 = 16 + 8;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The kernel's longest program.
pub const MAX_LEN: usize = 4096;

/// Calls in a leaf of the tree, tested one after another.
const LEAF: usize = 3;

/// The ioctl requests a filter allows by their argument, when it does not allow `ioctl` whole.
pub struct IoctlArgs<'a> {
    /// Requests allowed exactly (their low 32 bits).
    pub exact: &'a [u32],
    /// Request types (bits 8-15) allowed whole.
    pub types: &'a [u8],
}

/// What a range of call numbers leads to.
#[derive(Clone, Copy)]
enum Target {
    Match,
    /// The ioctl request tests at the program's end.
    Ioctl,
}

/// Builds the program: calls in `numbers` get `on_match`; `ioctl` with a request `ioctl`
/// names gets `on_match` too; other calls get `otherwise`. A call made with another
/// architecture's numbering kills the process (`KILL_PROCESS`, as `seccompiler`'s programs do).
pub fn program(
    numbers: impl IntoIterator<Item = u32>,
    ioctl: Option<IoctlArgs>,
    on_match: u32,
    otherwise: u32,
) -> BpfProgram {
    let ioctl_nr = libc::SYS_ioctl as u32;
    let mut numbers: Vec<u32> = numbers.into_iter().collect();
    numbers.sort_unstable();
    numbers.dedup();
    let ioctl = ioctl.filter(|_| numbers.binary_search(&ioctl_nr).is_err());
    let mut ranges: Vec<(u32, u32, Target)> = Vec::new();
    for n in numbers {
        match ranges.last_mut() {
            Some((_, hi, Target::Match)) if hi.checked_add(1) == Some(n) => *hi = n,
            _ => ranges.push((n, n, Target::Match)),
        }
    }
    if ioctl.is_some() {
        let at = ranges.partition_point(|&(lo, _, _)| lo < ioctl_nr);
        ranges.insert(at, (ioctl_nr, ioctl_nr, Target::Ioctl));
    }

    let mut p = Builder {
        code: vec![
            stmt(BPF_LD_W_ABS, ARCH),
            jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
            stmt(BPF_LD_W_ABS, NR),
        ],
        to_ioctl: Vec::new(),
        on_match,
        otherwise,
    };
    p.node(&ranges);
    if let Some(ioctl) = ioctl {
        let start = p.code.len();
        for at in std::mem::take(&mut p.to_ioctl) {
            p.code[at].k = (start - at - 1) as u32;
        }
        p.code.push(stmt(BPF_LD_W_ABS, ARG1_LOW));
        for &request in ioctl.exact {
            p.code.push(jump(BPF_JEQ_K, request, 0, 1));
            p.code.push(stmt(BPF_RET_K, on_match));
        }
        if !ioctl.types.is_empty() {
            p.code.push(stmt(BPF_ALU_AND_K, 0xff00));
            for &t in ioctl.types {
                p.code.push(jump(BPF_JEQ_K, u32::from(t) << 8, 0, 1));
                p.code.push(stmt(BPF_RET_K, on_match));
            }
        }
        p.code.push(stmt(BPF_RET_K, otherwise));
    }
    p.code
}

struct Builder {
    code: Vec<sock_filter>,
    /// The `JA`s to the ioctl tests, patched once they are placed.
    to_ioctl: Vec<usize>,
    on_match: u32,
    otherwise: u32,
}

impl Builder {
    /// The tests for `ranges` (sorted, disjoint), with the call number in the accumulator.
    fn node(&mut self, ranges: &[(u32, u32, Target)]) {
        if ranges.len() <= LEAF {
            for &(lo, hi, target) in ranges {
                match target {
                    Target::Ioctl => {
                        self.code.push(jump(BPF_JEQ_K, lo, 0, 1));
                        self.to_ioctl.push(self.code.len());
                        self.code.push(stmt(BPF_JA, 0));
                    }
                    Target::Match if lo == hi => {
                        self.code.push(jump(BPF_JEQ_K, lo, 0, 1));
                        self.code.push(stmt(BPF_RET_K, self.on_match));
                    }
                    Target::Match => {
                        self.code.push(jump(BPF_JGE_K, lo, 0, 2));
                        self.code.push(jump(BPF_JGT_K, hi, 1, 0));
                        self.code.push(stmt(BPF_RET_K, self.on_match));
                    }
                }
            }
            self.code.push(stmt(BPF_RET_K, self.otherwise));
            return;
        }
        // At or above the middle range's start: the right half, through a jump of any length.
        let mid = ranges.len() / 2;
        self.code.push(jump(BPF_JGE_K, ranges[mid].0, 0, 1));
        let to_right = self.code.len();
        self.code.push(stmt(BPF_JA, 0));
        self.node(&ranges[..mid]);
        self.code[to_right].k = (self.code.len() - to_right - 1) as u32;
        self.node(&ranges[mid..]);
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Runs `program` on a call (`nr`, `arch`, second argument `arg1`) as the kernel would, for
/// tests: the action it returns. Only the instructions our programs and `seccompiler`'s use.
#[cfg(test)]
pub fn run(program: &[sock_filter], nr: u32, arch: u32, arg1: u64) -> u32 {
    walk(program, nr, arch, arg1).0
}

/// [`run`], and how many instructions the walk took.
#[cfg(test)]
pub fn walk(program: &[sock_filter], nr: u32, arch: u32, arg1: u64) -> (u32, usize) {
    let (mut a, mut pc) = (0u32, 0usize);
    for steps in 1.. {
        let i = &program[pc];
        pc += 1;
        match i.code {
            BPF_LD_W_ABS => {
                a = match i.k {
                    NR => nr,
                    ARCH => arch,
                    ARG1_LOW => arg1 as u32,
                    28 => (arg1 >> 32) as u32,
                    k => panic!("load of seccomp_data offset {k}"),
                }
            }
            BPF_ALU_AND_K => a &= i.k,
            BPF_JA => pc += i.k as usize,
            BPF_JEQ_K | BPF_JGT_K | BPF_JGE_K => {
                let taken = match i.code {
                    BPF_JEQ_K => a == i.k,
                    BPF_JGT_K => a > i.k,
                    _ => a >= i.k,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            BPF_RET_K => return (i.k, steps),
            code => panic!("instruction {code:#x}"),
        }
    }
    unreachable!("a walk ends at a return")
}
