//! The ioctl requests of the VMM's own thread kinds: each kind's allowed requests go through
//! a confined thread and a neighbour is refused (in child processes, every mode); and, where
//! the host has KVM, a vCPU thread confined as the VMM confines it makes every request a real
//! vCPU makes (run, state save, device wiring), so a number that differs from the one
//! `kvm-ioctls` sends stops the test.

use hypervisor::kvm_requests::{self as kvm, VCPU_THREAD};
use seccomp::testing::assert_ioctls_confined;

fn vcpu_allowed() -> Vec<u64> {
    let mut all = VCPU_THREAD.to_vec();
    all.extend_from_slice(net_util::RUNNING_TAP_IOCTLS);
    all
}

/// A vCPU thread creating a VM (KVM_CREATE_VM, KVM's type like all it makes) is stopped.
#[test]
fn vcpu_ioctls_refuse_creating_a_vm() {
    assert_ioctls_confined(
        "seccomp_filters::ioctl_tests::vcpu_ioctls_refuse_creating_a_vm",
        "vcpu0",
        super::vcpu,
        &vcpu_allowed(),
        kvm::KVM_CREATE_VM,
    );
}

/// A vCPU thread mapping host memory into the guest (KVM_SET_USER_MEMORY_REGION) is stopped.
#[test]
fn vcpu_ioctls_refuse_memory_slots() {
    assert_ioctls_confined(
        "seccomp_filters::ioctl_tests::vcpu_ioctls_refuse_memory_slots",
        "vcpu1",
        super::vcpu,
        &vcpu_allowed(),
        kvm::KVM_SET_USER_MEMORY_REGION,
    );
}

/// A vCPU thread attaching a TAP to another interface (TUNSETIFF, the type of the TAP
/// requests it makes) is stopped.
#[test]
fn vcpu_ioctls_refuse_retargeting_a_tap() {
    assert_ioctls_confined(
        "seccomp_filters::ioctl_tests::vcpu_ioctls_refuse_retargeting_a_tap",
        "vcpu0",
        super::vcpu,
        &vcpu_allowed(),
        libc::TUNSETIFF,
    );
}

/// The on-demand loader copies and wakes; registering more memory (UFFDIO_REGISTER) is
/// refused.
#[test]
fn uffd_ioctls_refuse_registering() {
    fn allowed() -> [u64; 2] {
        crate::uffd::loader_ioctls()
    }
    assert_ioctls_confined(
        "seccomp_filters::ioctl_tests::uffd_ioctls_refuse_registering",
        "uffd",
        super::uffd,
        &allowed(),
        crate::uffd::UFFDIO_REGISTER_IOCTL(),
    );
}

/// The control loop reaches its four families; another device's (vhost's VHOST_SET_OWNER,
/// a block device's BLKDISCARD) is refused.
#[test]
fn control_loop_ioctls_refuse_other_families() {
    assert_ioctls_confined(
        "seccomp_filters::ioctl_tests::control_loop_ioctls_refuse_other_families",
        "vmm",
        super::control_loop,
        &[
            kvm::KVM_CREATE_VM,
            kvm::KVM_SET_USER_MEMORY_REGION,
            libc::TUNSETIFF,
            libc::TIOCGWINSZ,
            libc::FIONBIO,
            libc::SIOCSIFADDR,
            crate::uffd::UFFDIO_REGISTER_IOCTL(),
        ],
        0xaf01,
    );
    assert!(!super::control_loop().allows_ioctl(0x1277));
}

/// Whether this process is the child of `a_confined_vcpu_thread_makes_every_kvm_request`.
const KVM_CHILD: &str = "CH_SECCOMP_TEST_KVM";

/// In a child process with `--seccomp true`: the control loop's side creates a VM, its
/// irqchip and a vCPU with the host's CPUID, as a boot does; a thread confined with the vCPU
/// filter then runs the vCPU (immediate exit), saves its whole state (as a snapshot does,
/// whichever of XSAVE2, nested state, TSC rate the host has), and wires an irqfd, an
/// ioeventfd and an MSI route and takes them down, as a device's activation and reset do.
#[test]
fn a_confined_vcpu_thread_makes_every_kvm_request() {
    if std::env::var(KVM_CHILD).is_ok() {
        kvm_child();
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("no /dev/kvm: skipped");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "seccomp_filters::ioctl_tests::a_confined_vcpu_thread_makes_every_kvm_request",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KVM_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("confined-vcpu: ok"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

fn kvm_child() {
    use hypervisor::{Hypervisor, IoEventAddress, IrqRoute};
    use vmm_sys_util::eventfd::EventFd;

    seccomp::set_mode(seccomp::Mode::Trap);
    seccomp::start_spawner(super::spawner()).expect("start the spawner");
    let hv = hypervisor::KvmHypervisor::new().expect("KVM");
    let vm = hv.create_vm().expect("a VM");
    vm.create_irqchip().expect("its irqchip");
    let mut vcpu = vm.create_vcpu(0).expect("a vCPU");
    vcpu.set_cpuid(&hv.supported_cpuid().expect("CPUID"))
        .expect("its CPUID");
    let t = seccomp::spawn("vcpu0".into(), super::vcpu(), move || {
        vcpu.set_immediate_exit(true);
        let run = vcpu.run().map(|e| format!("{e:?}"));
        vcpu.set_immediate_exit(false);
        let state = vcpu.state().map(|s| s.msrs.len());
        let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let addr = IoEventAddress::Mmio(0xd000_0000);
        let route = IrqRoute::Msi {
            gsi: 24,
            address: 0xfee0_0000,
            data: 0x41,
            devid: None,
        };
        let wiring = (|| {
            vm.set_gsi_routing(&[route])?;
            vm.register_irqfd(&efd, 24)?;
            vm.unregister_irqfd(&efd, 24)?;
            vm.register_ioevent(&efd, addr, None)?;
            vm.unregister_ioevent(&efd, addr)?;
            vm.set_gsi_routing(&[])
        })();
        format!("run {run:?}, state {state:?}, wiring {wiring:?}")
    })
    .expect("spawn the vCPU thread");
    let result = t.join().expect("the vCPU thread");
    println!("\n{result}");
    assert!(result.starts_with("run Ok(\"Interrupted\")"), "{result}");
    assert!(!result.contains("Err("), "{result}");
    println!("\nconfined-vcpu: ok");
}
