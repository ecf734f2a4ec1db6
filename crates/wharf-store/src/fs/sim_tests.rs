//! Unit tests of [`super::SimFs`]: what survives each kind of crash, and the faults it injects.

use super::*;

fn write(fs: &SimFs, path: &str, bytes: &[u8]) -> Arc<dyn FsFile> {
    let file = fs.open(Path::new(path), OpenMode::CreateNew).unwrap();
    file.write_all_at(bytes, 0).unwrap();
    file
}

#[test]
fn power_loss_drops_unsynced_files_and_bytes() {
    let fs = SimFs::new(1);
    fs.create_dir_all(Path::new("/d")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let synced = write(&fs, "/d/a", b"hello");
    synced.sync_data().unwrap();
    fs.sync_dir(Path::new("/d")).unwrap();
    synced.write_all_at(b" world", 5).unwrap();
    write(&fs, "/d/b", b"never synced");
    fs.crash(CrashMode::LoseUnsynced);
    assert!(synced.size_bytes().is_err(), "old handles die with the crash");
    let after = fs.remount();
    assert_eq!(after.read_file(Path::new("/d/a")).unwrap(), b"hello");
    assert!(!after.exists(Path::new("/d/b")).unwrap());
}

#[test]
fn kill_keeps_unsynced_data() {
    let fs = SimFs::new(1);
    fs.create_dir_all(Path::new("/d")).unwrap();
    write(&fs, "/d/a", b"cached");
    fs.crash(CrashMode::KeepUnsynced);
    assert_eq!(fs.remount().read_file(Path::new("/d/a")).unwrap(), b"cached");
}

#[test]
fn space_limit_cuts_the_write_short() {
    let fs = SimFs::new(1);
    fs.create_dir_all(Path::new("/d")).unwrap();
    fs.set_space_bytes_max(Some(4));
    let file = fs.open(Path::new("/d/a"), OpenMode::CreateNew).unwrap();
    let error = file.write_all_at(b"123456", 0).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::StorageFull);
    assert_eq!(fs.read_file(Path::new("/d/a")).unwrap(), b"1234");
}

#[test]
fn allocated_space_counts_against_the_limit_and_is_never_refused_to_a_write() {
    let fs = SimFs::new(1);
    fs.create_dir_all(Path::new("/d")).unwrap();
    fs.set_space_bytes_max(Some(100));
    let file = fs.open(Path::new("/d/a"), OpenMode::CreateNew).unwrap();
    file.allocate(0, 80).unwrap();
    assert_eq!(fs.used_bytes(), 80);
    assert_eq!(file.size_bytes().unwrap(), 0, "the length is kept");
    let other = fs.open(Path::new("/d/b"), OpenMode::CreateNew).unwrap();
    assert_eq!(other.write_all_at(&[1; 30], 0).unwrap_err().kind(), io::ErrorKind::StorageFull);
    assert_eq!(file.allocate(80, 30).unwrap_err().kind(), io::ErrorKind::StorageFull);
    assert_eq!(fs.used_bytes(), 100, "a refused allocation takes nothing");
    other.set_len(0).unwrap();
    file.write_all_at(&[2; 80], 0).unwrap();
    assert_eq!(fs.used_bytes(), 80);
    file.allocate(80, 20).unwrap();
    file.release_allocation(80, 20).unwrap();
    assert_eq!(fs.used_bytes(), 80, "released space is free again");
    fs.remove_file(Path::new("/d/a")).unwrap();
    assert_eq!(fs.used_bytes(), 0, "a removed file gives its space back");
    fs.set_allocation_supported(false);
    assert_eq!(other.allocate(0, 1).unwrap_err().kind(), io::ErrorKind::Unsupported);
}

#[test]
fn failed_sync_keeps_data_undurable() {
    let fs = SimFs::new(1);
    fs.create_dir_all(Path::new("/d")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let file = write(&fs, "/d/a", b"x");
    fs.sync_dir(Path::new("/d")).unwrap();
    fs.fail_next_syncs(1);
    assert!(file.sync_data().is_err());
    fs.crash(CrashMode::LoseUnsynced);
    assert_eq!(fs.remount().read_file(Path::new("/d/a")).unwrap(), b"");
}

#[test]
fn rename_is_atomic_per_directory() {
    for seed in 0..20 {
        let fs = SimFs::new(seed);
        fs.create_dir_all(Path::new("/d")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        write(&fs, "/d/old", b"x").sync_data().unwrap();
        fs.sync_dir(Path::new("/d")).unwrap();
        fs.rename(Path::new("/d/old"), Path::new("/d/new")).unwrap();
        fs.crash(CrashMode::Random);
        let after = fs.remount();
        let old = after.exists(Path::new("/d/old")).unwrap();
        let new = after.exists(Path::new("/d/new")).unwrap();
        assert!(old != new, "exactly one name survives (seed {seed})");
    }
}
