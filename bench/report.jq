# Renders bench/run.sh's results (a JSON array of rows, `jq -s`) as a markdown table.
# Arguments: $table ("bulk" or "latency"), $conns (the space-separated BULK_CONNS).
def num($d): if . == null then "–" else (. * pow(10; $d) | round / pow(10; $d) | tostring) end;
# A ratio only where it means something: both known and a positive denominator.
def ratio($a; $b): if $a == null or $b == null or $b <= 0 then "–" else ($a / $b | num(2)) + "×" end;
def row($cells): "| " + ($cells | join(" | ")) + " |";
def find($p): (map(select(.path == $p)) | first) // {};

($conns | split(" ") | map(select(length > 0))) as $cs
| find("direct TCP") as $d
| find("stunnel pair") as $s
| if $table == "bulk" then
    row(["path"] + ($cs | map("\(.) conn Gbit/s", "× direct", "× stunnel")) + ["notes"]),
    row(["---"] + ($cs | map("---:", "---:", "---:")) + ["---"]),
    (.[] | . as $r
      | row([$r.path]
          + ($cs | map(. as $c | ($r.bulk[$c] // null) as $g
              | ($g | num(2)), ratio($g; $d.bulk[$c]), ratio($g; $s.bulk[$c])))
          + [$r.note // ""]))
  else
    ($d.latency.corrected_us // {}) as $dl
    | (($s.latency.corrected_us // {}) as $sl
      | {p50: (if $sl.p50 then $sl.p50 - $dl.p50 else null end),
         p99: (if $sl.p99 then $sl.p99 - $dl.p99 else null end)}) as $sa
    | row(["path", "p50", "p90", "p99", "p99.9", "added p50", "added p99",
           "added p50 ÷ stunnel's", "added p99 ÷ stunnel's", "path CPU (cores)",
           "path peak RSS (MiB)", "missing", "notes"]),
      row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
           "---:", "---"]),
      (.[] | . as $r | ($r.latency.corrected_us // null) as $l
        | if $l == null then
            row([$r.path, "–", "–", "–", "–", "–", "–", "–", "–", "–",
                 ($r.peak_rss_kib | if . then . / 1024 else null end | num(1)), "–", $r.note // ""])
          else
            ($l.p50 - $dl.p50) as $a50 | ($l.p99 - $dl.p99) as $a99
            | row([$r.path, ($l.p50 | num(1)), ($l.p90 | num(1)), ($l.p99 | num(1)),
                   ($l.p999 | num(1)), ($a50 | num(1)), ($a99 | num(1)),
                   ratio($a50; $sa.p50), ratio($a99; $sa.p99), ($r.cpu_cores | num(3)),
                   ($r.peak_rss_kib | if . then . / 1024 else null end | num(1)),
                   ($r.latency.missing | tostring), $r.note // ""])
          end)
  end
