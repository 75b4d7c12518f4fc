//! Watch every write to one guest frame: a tiny 64-bit guest stores to a tracked frame and to
//! an untracked one, then a device model writes into the tracked frame. Only the writes to the
//! tracked frame are reported, with old and new bytes and who wrote.
//!
//! `cargo run --release -p pagetrack-vmm --example watch`

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::{CodeAssembler, al, qword_ptr, rax, rdi};
use pagetrack::{Gfn, NotifierClass, TrackNotifier, WriteEvent};
use pagetrack_kvm::{Exit, Vm, VmConfig};
use pagetrack_vmm::x86::{self, GUEST_EXIT_PORT, LongModeLayout};
use vm_memory::{Bytes, GuestAddress};

/// Prints each event and keeps a copy.
#[derive(Default)]
struct Print(Mutex<Vec<String>>);

impl TrackNotifier for Print {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let line = format!(
            "{} wrote {:02x?} at {:#x} (was {:02x?})",
            e.source,
            e.new,
            e.gpa.0,
            e.old.unwrap_or(&[])
        );
        println!("{line}");
        if let Ok(mut v) = self.0.lock() {
            v.push(line);
        }
    }
}

/// Runs the example; returns the printed events.
pub fn watch() -> Result<Vec<String>, Box<dyn std::error::Error>> {
    const RAM: u64 = 16 << 20;
    let vm = Vm::new(VmConfig::default().with_ram(RAM))?;
    vm.add_ram(0, RAM)?;

    // The guest: two stores into frame 0x5, one into frame 0x9, then exit on port 0xf4.
    let mut a = CodeAssembler::new(64)?;
    a.mov(rdi, 0x5000u64)?;
    a.mov(rax, 0x1122_3344_5566_7788u64)?;
    a.mov(qword_ptr(rdi), rax)?; // tracked: reported
    a.mov(qword_ptr(rdi + 8), rax)?; // tracked: reported
    a.mov(qword_ptr(0x9000u64), rax)?; // untracked: runs at full speed, not reported
    a.out(u32::from(GUEST_EXIT_PORT), al)?;
    let code = a.assemble(0x1000)?;
    vm.untracked_memory()
        .write_slice(&code, GuestAddress(0x1000))?;

    let layout = LongModeLayout::new(RAM)?;
    let mut vcpu = vm.create_vcpu(0)?;
    x86::setup_long_mode(
        vm.kvm(),
        vcpu.fd(),
        &*vm.untracked_memory(),
        &layout,
        0x1000,
        0,
    )?;

    let print = Arc::new(Print::default());
    let _handle = vm
        .tracker()
        .register(print.clone(), NotifierClass::Ordinary)?;
    vm.tracker().add_gfn(Gfn(0x5))?;

    match vcpu.run()? {
        Exit::IoOut {
            port: GUEST_EXIT_PORT,
            ..
        } => {}
        other => return Err(format!("unexpected exit {other:?}").into()),
    }
    vm.memory()
        .write_slice(&[0xde, 0xad], GuestAddress(0x5100))?; // a device (DMA) write
    let lines = print.0.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(lines)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    watch().map(|_| ())
}
