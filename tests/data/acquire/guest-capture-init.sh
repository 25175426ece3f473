#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
echo "@@BEGIN uname"; uname -a; echo "@@END"
echo "@@BEGIN iomem"; cat /proc/iomem; echo "@@END"
echo "@@BEGIN lockdown"; cat /sys/kernel/security/lockdown; echo "@@END"
echo "@@BEGIN vmcoreinfo"; cat /sys/kernel/vmcoreinfo; echo "@@END"
echo "@@BEGIN kcore-head"; dd if=/proc/kcore bs=4096 count=8 2>/dev/null | base64; echo "@@END"
for a in 0 1 159 240 256 4096 12288; do
  echo "@@BEGIN devmem $a"; dd if=/dev/mem bs=4096 skip=$a count=1 2>/dev/null | md5sum; dd if=/dev/mem bs=4096 skip=$a count=1 2>&1 >/dev/null | head -1; echo "@@END"
done
echo "@@BEGIN devmem-sub 0x9fbf0"; dd if=/dev/mem bs=16 skip=$((0x9fbf0/16)) count=2 2>/dev/null | hexdump -C; echo "@@END"
echo "@@BEGIN devmem-cross"; dd if=/dev/mem bs=8192 skip=$((0xff000)) iflag=skip_bytes count=1 2>&1 | tail -3; echo "@@END"
echo "@@BEGIN kcore-open"; dd if=/proc/kcore bs=64 count=1 2>&1 >/dev/null | head -1; echo "@@END"
echo "@@BEGIN devmem-open"; dd if=/dev/mem bs=64 count=1 2>&1 >/dev/null | head -1; echo "@@END"
echo "@@BEGIN cmdline"; cat /proc/cmdline; echo "@@END"
echo "@@BEGIN zero"; dd if=/dev/zero bs=4096 count=1 2>/dev/null | md5sum; echo "@@END"
poweroff -f
