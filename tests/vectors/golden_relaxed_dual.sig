DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=rsa;
	t=1700000000; h=from:from:to:to:cc:subject:subject:date:message-id;
	bh=udOfD7NsUr9kcfHmXWRj3h5KWA2UXf3RchdsDcK5lPs=; b=f7H5SvqDSUtWw6Sprxi
	8Yd7hhCLoLdCB3xr49iIcyt0vrkWeRV6b40af12hAMJO7v29s98yfDSsCn96g73ABYDKw1
	MdfGbYC3jHet8fRzKb3FFUrhE0+B182WvrQCifmv4gMujjyYIFs4D6tVbhCoZSl35Vcnl7
	A9rRY1LOwQ7w=
DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=ed;
	t=1700000000; h=from:from:to:to:cc:subject:subject:date:message-id;
	bh=udOfD7NsUr9kcfHmXWRj3h5KWA2UXf3RchdsDcK5lPs=; b=nNPp67UfQ2QoUKlb9LE
	WelUXR4hh/+EzeZppKO+xsi//qLNM1J5OAe4aYWExYyq69Al2enVn0+oLiXrR5pZ8AQ==
