//! First-boot growth on any GPT a disk can carry: reading (header checked before the entry
//! array is allocated) and growing never panic, and a grown GPT checks out (both headers and
//! the entries, CRCs included). Input: 8 bytes of disk size in sectors, then the disk's first
//! sectors (LBA 0, the header at LBA 1, the entries after).
#![no_main]
use appliance::image::gpt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let sectors = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 40);
    let disk = &data[8..];
    if let Ok((header, entries)) = gpt::read(&mut std::io::Cursor::new(disk)) {
        if let Ok(Some(g)) = gpt::grow(&header, &entries, sectors, "state") {
            gpt::check(&g.primary, &g.entries).expect("the new primary checks");
            gpt::check(&g.backup, &g.entries).expect("the new backup checks");
            assert!(g.new_last_lba < g.backup_entries_lba);
        }
    }
    if disk.len() > 512 {
        let _ = gpt::grow(&disk[..512.min(disk.len())], &disk[512..], sectors, "state");
    }
});
