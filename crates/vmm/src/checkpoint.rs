//! Checkpoints for replication: what the VMM offers a replication driver.
//!
//! The VMM knows nothing of backups or networks. A driver (crates/replication)
//! sends [`ReplRequest`]s through the VM's event channel
//! ([`crate::VmEvent::Repl`]) and gets:
//!
//! * `StartTracking`: KVM dirty logging and the disks' write logs switched
//!   on, and the list of populated guest pages (for the live pre-copy);
//! * `Harvest`: the pages written since the last harvest (pre-copy rounds);
//! * `Checkpoint`: one pause — device workers park (each net device's
//!   engine seals its epoch at that instant), vCPUs park, dirty pages are
//!   harvested and copied to a staging buffer, vCPU/VM/device state is
//!   captured, each disk's write log is taken — then the VM resumes. The
//!   transfer is not part of the pause;
//! * `Unprotect`: output flows freely again (the engines commit at once),
//!   disk logs and dirty logging stop.
//!
//! Commits go straight from the driver to the net devices through their
//! [`OutputCommit`] handles ([`ReplDevices`]), without the event loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::devices::lock;
use crate::devices::virtio::block::{DiskWrite, WriteLog, ID_LEN};
use crate::devices::virtio::commit::{OutputCommit, Sealed};
use crate::memory;
use crate::snapshot::{MachineSnapshot, Staging};
use crate::Vmm;

/// The error of a checkpoint asked of a paused VM.
pub const PAUSED: &str = "the VM is paused (ctl pause): no checkpoint until it resumes";

/// A net device as replication sees it.
pub struct NetDevice {
    pub mac: [u8; 6],
    /// Output commit's handle.
    pub commit: Arc<OutputCommit>,
}

/// A disk as replication sees it.
pub struct DiskDevice {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub read_only: bool,
    pub id: [u8; ID_LEN],
    pub log: Arc<WriteLog>,
}

/// The devices' replication handles, in device order.
#[derive(Default)]
pub struct ReplDevices {
    pub nets: Vec<NetDevice>,
    pub disks: Vec<DiskDevice>,
}

/// What the replication driver asks of the VMM.
#[derive(Debug)]
pub enum ReplRequest {
    StartTracking,
    Harvest,
    /// Take checkpoint `seq` into `buf`'s allocation (a recycled staging
    /// buffer). `protect`: from this checkpoint on, output is held until
    /// commits (the first checkpoint for a backup).
    Checkpoint {
        seq: u64,
        buf: Vec<u8>,
        protect: bool,
    },
    /// Pages harvested but not sent: they go into the next harvest or
    /// checkpoint.
    Carry {
        pages: Vec<u64>,
    },
    /// Output flows freely again; tracking stops.
    Unprotect,
}

/// The VMM's answer.
pub enum ReplReply {
    Pages(Vec<u64>),
    Checkpoint(Box<Checkpoint>),
    Done,
}

impl std::fmt::Debug for ReplReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplReply::Pages(p) => write!(f, "Pages({})", p.len()),
            ReplReply::Checkpoint(c) => write!(f, "Checkpoint(seq={})", c.seq),
            ReplReply::Done => write!(f, "Done"),
        }
    }
}

/// One checkpoint, captured in one pause.
pub struct Checkpoint {
    pub seq: u64,
    pub state: MachineSnapshot,
    /// The pages written since the previous checkpoint (or harvest).
    pub pages: Staging,
    /// Per net device: the epoch sealed in this checkpoint and the engine's
    /// delta (None: no output commit on that device, or its worker is not
    /// running yet).
    pub engines: Vec<Option<Sealed>>,
    /// Per disk: the guest's writes since the previous checkpoint, in order.
    pub disks: Vec<Vec<DiskWrite>>,
    /// How long the vCPUs were paused, in microseconds.
    pub pause_us: u64,
}

/// The replication driver's part of the control socket.
pub trait ReplHook: Send {
    /// `ctl protect ADDR`.
    fn protect(&mut self, addr: &str) -> Result<String, String>;
    /// `key=value` pairs appended to `ctl status`.
    fn status(&self) -> String;
}

impl Vmm {
    /// The devices' replication handles.
    pub fn repl_devices(&self) -> &ReplDevices {
        &self.repl
    }

    /// Guest memory (a handle to the same mapping), for a live pre-copy.
    pub fn memory(&self) -> memory::GuestMemoryMmap {
        self.mem.clone()
    }

    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// Reads and clears the dirty logs into both dirty sets: the
    /// snapshots' and, while replication tracks, the checkpoints'. Neither
    /// consumer may steal the other's pages.
    pub(crate) fn harvest(&mut self) -> Result<(), String> {
        let fresh = memory::harvest_dirty(&self.vm, &self.mem).map_err(|e| format!("dirty log: {e}"))?;
        self.dirty.add(&fresh);
        if self.tracking {
            self.repl_dirty.add(&fresh);
        }
        Ok(())
    }

    /// Installs the replication driver's handler of `ctl protect` and its
    /// part of `ctl status`.
    pub fn set_repl_hook(&mut self, hook: Box<dyn ReplHook>) {
        self.repl_hook = Some(hook);
    }

    pub(crate) fn repl_protect(&mut self, addr: &str) -> Result<String, String> {
        match &mut self.repl_hook {
            Some(h) => h.protect(addr),
            None => Err("this VM cannot be protected: it runs without replication support".into()),
        }
    }

    pub(crate) fn repl_status(&self) -> Option<String> {
        self.repl_hook.as_ref().map(|h| h.status())
    }

    pub(crate) fn handle_repl(
        &mut self,
        req: ReplRequest,
        control: &crate::vcpu::VcpuControl,
        threads: &[std::thread::JoinHandle<()>],
    ) -> Result<ReplReply, String> {
        match req {
            ReplRequest::StartTracking => {
                memory::register_memory(&self.vm, &self.mem, true).map_err(|e| format!("dirty logging: {e}"))?;
                // From here on every write is logged; what was there before
                // is in the populated pages.
                self.harvest()?;
                self.tracking = true;
                self.repl_dirty.delivered();
                for d in &self.repl.disks {
                    d.log.start();
                }
                Ok(ReplReply::Pages(Staging::populated_pages(&self.mem)))
            }
            ReplRequest::Harvest => {
                self.harvest()?;
                let pages = self.repl_dirty.pages().to_vec();
                self.repl_dirty.delivered();
                Ok(ReplReply::Pages(pages))
            }
            ReplRequest::Carry { pages } => {
                self.carry_pages(&pages);
                Ok(ReplReply::Done)
            }
            ReplRequest::Checkpoint { seq, buf, protect } => self
                .checkpoint(seq, buf, protect, control, threads)
                .map(|c| ReplReply::Checkpoint(Box::new(c))),
            ReplRequest::Unprotect => {
                for n in &self.repl.nets {
                    n.commit.set_auto_commit(true);
                }
                for d in &self.repl.disks {
                    d.log.stop();
                }
                self.tracking = false;
                self.repl_dirty.delivered();
                if self.snapshot_dir.is_none() {
                    // Snapshots still need the dirty log once they started.
                    memory::register_memory(&self.vm, &self.mem, false).map_err(|e| format!("dirty logging: {e}"))?;
                }
                Ok(ReplReply::Done)
            }
        }
    }

    /// One checkpoint: pause, capture, resume (see the module docs).
    fn checkpoint(
        &mut self,
        seq: u64,
        buf: Vec<u8>,
        protect: bool,
        control: &crate::vcpu::VcpuControl,
        threads: &[std::thread::JoinHandle<()>],
    ) -> Result<Checkpoint, String> {
        if control.is_paused() {
            return Err(PAUSED.into());
        }
        let msrs = self.msrs()?;
        let _rt = crate::RealTime::enter();
        for n in &self.repl.nets {
            if protect {
                n.commit.set_auto_commit(false);
            }
            n.commit.request_seal();
        }
        let t0 = Instant::now();
        self.mmio.request_pause_all();
        // Each vCPU thread saves its own state as it parks.
        let save = control.request_save(msrs);
        let saved = self.pause_vcpus(control, threads).and_then(|()| {
            if control.wait_saved(save, std::time::Duration::from_secs(5)) {
                Ok(())
            } else {
                Err("vCPUs did not save their state within 5 s".to_string())
            }
        });
        if let Err(e) = saved {
            control.cancel_save(save);
            control.resume();
            self.mmio.resume_all();
            return Err(e);
        }
        let captured = self.capture_checkpoint(control, save, seq, buf);
        control.resume();
        let pause_us = t0.elapsed().as_micros() as u64;
        self.mmio.resume_all();
        drop(_rt);
        let mut c = captured?;
        c.pause_us = pause_us;
        Ok(c)
    }

    /// With the VM parked: everything of checkpoint `seq` but its pause time.
    fn capture_checkpoint(
        &mut self,
        control: &crate::vcpu::VcpuControl,
        save: u64,
        seq: u64,
        buf: Vec<u8>,
    ) -> Result<Checkpoint, String> {
        let vcpus = control.take_states(save)?;
        let vm = remora_vmstate::save_vm(&self.vm).map_err(|e| e.to_string())?;
        let serial = lock(&self.serial).state();
        let devices = self
            .mmio
            .pause_all()
            .map_err(|e| format!("cannot checkpoint the devices: {e}"))?;
        // Device workers are parked: their seals and logs are final.
        let engines: Vec<Option<Sealed>> = self.repl.nets.iter().map(|n| n.commit.take_sealed()).collect();
        let disks: Vec<Vec<DiskWrite>> = self.repl.disks.iter().map(|d| d.log.take()).collect();
        self.harvest()?;
        let (pages, _) = Staging::copy_until(&self.mem, self.repl_dirty.pages(), buf, None);
        // Staged: a checkpoint that does not reach the backup ends the
        // protection, and a new one starts with a full copy.
        self.repl_dirty.delivered();
        Ok(Checkpoint {
            seq,
            state: MachineSnapshot {
                seq: seq as u32,
                mem_mib: self.mem_mib,
                vcpus,
                vm,
                serial,
                devices,
            },
            pages,
            engines,
            disks,
            pause_us: 0,
        })
    }

    /// Pages harvested but not sent (the rest of a pre-copy): the next
    /// checkpoint holds them.
    pub fn carry_pages(&mut self, pages: &[u64]) {
        self.repl_dirty.add(pages);
    }
}
