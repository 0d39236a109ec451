//! The tree programs against `seccompiler`'s chains for the same filters, run by the test
//! interpreter on every call number and the ioctl requests that could tell them apart.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::bpf::{self, run, walk};
use super::{base, Filter, Sysno};

const X86_64: u32 = 0xc000_003e;
const I386: u32 = 0x4000_0003;

/// `filter` as `seccompiler` lays it out (what `Filter::compile` built before the trees).
fn chain(filter: &Filter, mismatch: SeccompAction) -> BpfProgram {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = filter
        .allowed()
        .chain(base::QUIET.iter().copied())
        .map(|s| (i64::from(s.id()), Vec::new()))
        .collect();
    let types: Vec<u8> = filter.ioctl_types().collect();
    let exact: Vec<u64> = filter.ioctls().collect();
    if !filter.allows(Sysno::ioctl) && (!types.is_empty() || !exact.is_empty()) {
        let request = |op, value| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                op,
                value,
            )
            .unwrap()])
            .unwrap()
        };
        let mut ioctl: Vec<SeccompRule> = types
            .iter()
            .map(|&t| request(SeccompCmpOp::MaskedEq(0xff00), u64::from(t) << 8))
            .collect();
        ioctl.extend(exact.iter().map(|&r| request(SeccompCmpOp::Eq, r)));
        rules.insert(i64::from(Sysno::ioctl.id()), ioctl);
    }
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .unwrap()
        .try_into()
        .unwrap()
}

/// Requests that tell ioctl rules apart: each allowed one, its neighbours, the same with junk
/// in the upper half, other requests of each allowed type, and some of no allowed type.
fn requests(filter: &Filter) -> Vec<u64> {
    let mut out = vec![0, 1, 0x5401, 0xae80, 0xffff_ffff, 0x8004_ae01, u64::MAX];
    for r in filter.ioctls() {
        out.extend([r, r + 1, r.wrapping_sub(1), r | 0xdead_0000_0000_0000]);
    }
    for t in filter.ioctl_types() {
        let t = u64::from(t) << 8;
        out.extend([t, t | 0x7f, t | 0xc008_0001, t | 0x1_0000_0000, t ^ 0x100]);
    }
    out
}

fn assert_same(filter: &Filter, mismatch: SeccompAction) {
    let tree = filter.compile(mismatch.clone()).unwrap();
    let chain = chain(filter, mismatch);
    assert!(tree.len() < bpf::MAX_LEN);
    let ioctl = Sysno::ioctl.id() as u32;
    for arch in [X86_64, I386] {
        for nr in (0..600).chain([0x4000_0000, 0x4000_0001, 0x4000_0010, u32::MAX]) {
            let args: Vec<u64> = if nr == ioctl {
                requests(filter)
            } else {
                vec![0]
            };
            for arg in args {
                assert_eq!(
                    run(&tree, nr, arch, arg),
                    run(&chain, nr, arch, arg),
                    "filter '{}': call {nr}, arch {arch:#x}, argument {arg:#x}",
                    filter.kind()
                );
            }
        }
    }
}

#[test]
fn trees_decide_as_seccompilers_chains() {
    let terminal = Filter::new("terminal").allow_ioctl_types(b"T");
    let exact = Filter::new("exact").allow_ioctls(&[0x541b, 0x8004_ae01, 0xc008_ae67]);
    let both = Filter::new("both")
        .allow_ioctl_types(&[0xae, b'T', 0x89, 0xaa])
        .allow_ioctls(&[0x4008_ae6a, 0x8090_ae81, 0x4020_ae46])
        .allow(&[
            Sysno::mmap,
            Sysno::munmap,
            Sysno::mremap,
            Sysno::io_uring_enter,
        ]);
    let whole = Filter::new("whole")
        .allow(&[Sysno::ioctl])
        .allow_ioctls(&[0x541b]);
    let runs = Filter::new("runs").allow(&Sysno::iter().take(80).collect::<Vec<_>>());
    for filter in [
        Filter::new("base"),
        terminal,
        exact,
        both.clone(),
        whole,
        runs,
        Filter::new("everything")
            .merge(&both)
            .allow(&Sysno::iter().collect::<Vec<_>>()),
    ] {
        for mismatch in [
            SeccompAction::Trap,
            SeccompAction::Log,
            SeccompAction::Errno(1),
        ] {
            assert_same(&filter, mismatch);
        }
    }
}

#[test]
fn quiet_tree_fails_only_the_quiet_calls() {
    let eacces = u32::from(SeccompAction::Errno(libc::EACCES as u32));
    let allow = u32::from(SeccompAction::Allow);
    let filter = Filter::new("some").allow(&[Sysno::socket]);
    let quiet = filter.quiet_denials().unwrap().expect("a quiet filter");
    for nr in 0..600u32 {
        let denied = base::QUIET
            .iter()
            .any(|s| s.id() as u32 == nr && !filter.allows(*s));
        let expect = if denied { eacces } else { allow };
        assert_eq!(run(&quiet, nr, X86_64, 0), expect, "call {nr}");
    }
    assert_eq!(
        run(&quiet, 2, I386, 0),
        libc::SECCOMP_RET_KILL_PROCESS,
        "another architecture's numbering"
    );
}

/// The trees of the VMM's longest lists walk a few dozen instructions for any call, where a
/// chain walks up to two per allowed call.
#[test]
fn tree_walks_are_short() {
    let all: Vec<Sysno> = Sysno::iter().step_by(2).collect();
    let filter = Filter::new("long").allow(&all).allow_ioctl_types(b"T");
    let tree = filter.compile(SeccompAction::Trap).unwrap();
    let chain = chain(&filter, SeccompAction::Trap);
    assert!(
        tree.len() < chain.len(),
        "{} vs {}",
        tree.len(),
        chain.len()
    );
    let worst = (0..600)
        .map(|nr| walk(&tree, nr, X86_64, 0).1)
        .max()
        .unwrap();
    assert!(worst <= 40, "longest walk {worst}");
}
